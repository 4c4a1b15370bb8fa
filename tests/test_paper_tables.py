"""Docstrings that say what the code does: every paper-named verb documents its defaults in a
"paper | released code | mechlib" table (STYLE.md 17), and the interventions' module docstring
sends a reader to the paper's method, not to its static ablation."""

import re

import pytest

import mechlib
from mechlib import interventions
from mechlib.analyses import edges

RULE = re.compile(r"^=+( +=+)+$")

PAPER_VERBS = {
    # the verbs the fidelity audit found without a table
    "act_head_search": mechlib.act_head_search,
    "redistribute_attention": interventions.redistribute_attention,
    "massive_activations": mechlib.massive_activations,
    "attention_sinks": mechlib.attention_sinks,
    "sink_dimensions": mechlib.sink_dimensions,
    "head_divergence": mechlib.head_divergence,
    "position_invariant": interventions.position_invariant,
    "circuit_overlap": mechlib.circuit_overlap,
    # and the ones that had one
    "find_circuit": mechlib.find_circuit,
    "self_logits_augmentation": mechlib.self_logits_augmentation,
    "vista": interventions.vista,
    "var": interventions.var,
    "vhr": interventions.vhr,
    "calibrate_attention": interventions.calibrate_attention,
    "ablate_massive": interventions.ablate_massive,
    "edge_attribution (module)": edges,
}


def tables(doc: str) -> list[tuple[str, list[str]]]:
    """``(header, body rows)`` of every RST simple table in ``doc``."""
    lines = [line.strip() for line in (doc or "").splitlines()]
    rules = [i for i, line in enumerate(lines) if RULE.match(line)]
    out = []
    for a, b, c in zip(rules, rules[1:], rules[2:]):
        if b - a > 1 and c - b > 1 and lines[a] == lines[b] == lines[c]:
            out.append((" ".join(lines[a + 1:b]), [line for line in lines[b + 1:c] if line]))
    return out


@pytest.mark.parametrize("name", sorted(PAPER_VERBS))
def test_paper_named_verbs_have_a_paper_code_mechlib_table(name):
    found = [(head, body) for head, body in tables(PAPER_VERBS[name].__doc__)
             if all(w in head for w in ("paper", "released code", "mechlib"))]
    assert found, f"{name}'s docstring has no 'paper | released code | mechlib' table"
    assert len(found[0][1]) >= 3, f"{name}'s table has fewer than three rows"


def test_the_table_parser_reads_a_table_and_rejects_prose():
    doc = """x

    ======  =====  =======  ======
    choice  paper  released code  mechlib
    ======  =====  =======  ======
    a       b      c        d
    ======  =====  =======  ======
    """
    assert tables(doc) == [("choice  paper  released code  mechlib", ["a       b      c        d"])]
    assert tables("paper, released code and mechlib, in prose") == []


def test_interventions_docstring_names_the_papers_methods_and_their_ablations():
    doc = interventions.__doc__
    methods, ablations = doc.split("Static ablations")
    for line in (":func:`vhr` — VHR", ":func:`steering_vectors` + :func:`vista` — VISTA", ":func:`var` — VAR",
                 ":func:`calibrate_attention` — ACT", ":func:`position_invariant` — PINE"):
        assert line in methods
    for static, method in (("scale_heads", "vhr"), ("steer_residual", "vista"), ("redistribute_attention", "var")):
        assert f":func:`{static}`" not in methods
        assert f":func:`{static}`" in ablations and f":func:`{method}`" in ablations
    assert "VISTA" not in interventions.steer_residual.__doc__.split("not VISTA")[0]


def test_vista_docstrings_say_what_the_released_code_returns_for_one_pair():
    doc = " ".join(interventions.steering_vectors.__doc__.split())
    assert "v + e₀" in doc and "mechlib follows the paper (v)" in doc
    assert "= the difference" not in interventions.vista.__doc__
