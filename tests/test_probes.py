"""Probes on scikit-learn: a planted direction is found (and only it, by the sparse probe), the
controls stay at chance, token-level examples are split by prompt, and PCA separates planted groups."""

import pytest
import torch

import mechlib

N, T, D = 40, 6, 64


def _planted(tiny_llama, dim=7, strength=4.0, seed=0):
    """A cache of random 'activations' where label-1 prompts have +strength in one dimension."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % 2
    acts = torch.randn(N, T, D, generator=g)
    acts[labels == 1, :, dim] += strength
    toks = torch.randint(5, 60, (N, T), generator=g)
    return toks, labels, {"blocks.0.hook_resid_post": acts, "blocks.1.hook_resid_post": torch.randn(N, T, D, generator=g)}


def test_probe_finds_a_planted_direction_and_controls_stay_at_chance(tiny_llama):
    toks, labels, cache = _planted(tiny_llama)
    r = mechlib.probe(tiny_llama, toks, labels, layers=[0, 1], method="l1", C=0.1, cache=cache)
    assert r.values[0, 1] > 0.95 and r.values[1, 1] < 0.8  # layer 0 carries it, layer 1 does not
    assert r.top_dims(0, 1) == [7]
    assert abs(float(r.controls[0, 0]) - 0.5) < 0.25  # shuffled labels
    assert float(r.ci_low[0, 1]) <= float(r.values[0, 1]) <= float(r.ci_high[0, 1])
    assert set(r.table().columns) >= {"layer", "accuracy", "auc", "shuffled_auc", "random_direction_auc"}
    r.plot()


def test_probe_accessors_take_the_layer_number_not_its_position(tiny_llama):
    """A probe over ``layers=[1]`` has one entry, labelled L1: ``top_dims(1)`` is that probe (it
    raised IndexError when accessors indexed by position); a layer the probe does not hold is a
    clear error; a bare position still reads, with a warning."""
    toks, labels, cache = _planted(tiny_llama)
    cache = {"blocks.1.hook_resid_post": cache["blocks.0.hook_resid_post"]}  # the direction at layer 1
    r = mechlib.probe(tiny_llama, toks, labels, layers=[1], method="l1", C=0.1, cache=cache)
    assert r.labels["layer"] == ("L1",)
    assert r.top_dims(1, 1) == [7] and r.top_dims("L1", 1) == [7]
    X = cache["blocks.1.hook_resid_post"][:, -1]
    assert float(((r.decision_function(1, X) > 0).long() == labels).float().mean()) > 0.9
    with pytest.raises(ValueError, match="no layer 5: its layers are L1"):
        r.top_dims(5)
    with pytest.raises(ValueError, match="no layer 'L0'"):  # a label is never read as a position
        r.decision_function("L0", X)
    with pytest.warns(UserWarning, match="pass the layer number \\(1\\)"):
        assert r.top_dims(0, 1) == [7]


def test_token_level_probe_groups_folds_by_prompt(tiny_llama):
    toks, _, cache = _planted(tiny_llama)
    lab = torch.full((N, T), -1)
    lab[:, 0] = 1  # the first token of every prompt
    lab[:, 3] = 0
    cache["blocks.0.hook_resid_post"][:, 0, 11] += 4.0
    r = mechlib.probe(tiny_llama, toks, lab, layers=[0], positions="all", method="l1", C=0.1, cache=cache)
    assert r.metadata["n_examples"] == 2 * N and r.top_dims(0, 1) == [11] and r.values[0, 1] > 0.95


def test_probe_input_errors(tiny_llama):
    toks, labels, cache = _planted(tiny_llama)
    with pytest.raises(ValueError, match="binary"):
        mechlib.probe(tiny_llama, toks, torch.zeros(N, dtype=torch.long), layers=[0], cache=cache)
    with pytest.raises(ValueError, match="one per prompt"):
        mechlib.probe(tiny_llama, toks, labels[:5], layers=[0], cache=cache)
    with pytest.raises(KeyError, match="lacks"):
        mechlib.probe(tiny_llama, toks, labels, layers=[0], site="mlp_out", cache=cache)


def test_probe_runs_the_model_when_no_cache(tiny_llama):
    prompts = ["Mary gave a drink to John"] * 6 + ["John went to the store and Mary"] * 6
    labels = torch.tensor([0] * 6 + [1] * 6)
    r = mechlib.probe(tiny_llama, prompts, labels, cv=3)
    assert r.values.shape == (2, 2) and r.values[:, 1].min() > 0.9  # different prompts: trivially decodable


def test_pca_separates_planted_groups(tiny_llama):
    prompts = ["Mary gave a drink to John", "John went to the store and Mary gave a drink to"] * 3
    r = mechlib.pca(tiny_llama, prompts, layer=1)
    assert r.values.shape[1] == 2 and float(r.explained.sum()) <= 1.0
    r.plot()


def test_probe_groups_keep_minimal_pairs_together_and_refit_scores_new_examples(tiny_llama):
    toks, labels, cache = _planted(tiny_llama)
    groups = torch.arange(N) // 2  # pairs (2k, 2k+1) have different labels
    r = mechlib.probe(tiny_llama, toks, labels, layers=[0], method="l1", C=0.1, cache=cache, groups=groups.tolist())
    assert r.values[0, 1] > 0.95 and r.oof.shape == (1, N)
    X = cache["blocks.0.hook_resid_post"][:, -1]
    score = r.decision_function(0, X)
    assert float(((score > 0).long() == labels).float().mean()) > 0.9
    from mechlib.analyses.probes import _auc
    from sklearn.metrics import roc_auc_score
    import numpy as np

    y, s = np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.8, 0.4, 0.3, 0.9])
    assert _auc(y, s) == pytest.approx(roc_auc_score(y, s))
