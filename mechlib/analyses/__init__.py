"""One analysis per module, one verb per analysis: ``verb(model, inputs, [metric], *, options) -> Result``."""
