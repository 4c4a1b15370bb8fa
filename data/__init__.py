"""Task data (templates, names, objects, facts) shipped with mechlib as ``mechlib.data``."""
