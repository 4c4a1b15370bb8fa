"""mechlib.evals: CHAIR and POPE from the papers' definitions, and the data loaders on fixtures.

Known answers are computed by hand from the definitions (Rohrbach et al. 2018 and its chair.py;
Li et al. 2023 and RUCAIBox/POPE). The singulariser is checked against pattern 3.6's output
(tests/fixtures/pattern_singularize.json). No test touches the network: ``MECHLIB_OFFLINE=1`` and
a patched ``socket.create_connection`` make any attempt fail loudly.

CHAIR's published synonym list is not in the repository (it is fetched at run time): every test
reads the hand-written stand-in tests/fixtures/chair_synonyms_standin.txt (26 categories, our own
synonyms) through ``$MECHLIB_CHAIR_SYNONYMS``, so a developer's cached copy never changes a result.
The download branch is tested on a file:// URL serving the stand-in.
"""

import doctest
import hashlib
import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechlib import evals
from mechlib.evals import _text
from mechlib.evals import datasets as ds
from mechlib.evals.chair import caption_objects, vocabulary
from mechlib.evals.datasets import DatasetNotAvailable, online

FIX = Path(__file__).parent / "fixtures"
COCO = FIX / "mini_coco"
TEXT = FIX / "text"
chair_module = importlib.import_module("mechlib.evals.chair")  # `mechlib.evals.chair` the attribute is the function
STANDIN = FIX / "chair_synonyms_standin.txt"   # hand-written stand-in for CHAIR's synonym list
STANDIN_CATEGORIES = [
    "person", "bicycle", "car", "motorcycle", "bus", "train", "horse", "dog", "cat", "elephant", "stop sign",
    "bench", "bottle", "wine glass", "cup", "spoon", "orange", "hot dog", "chair", "couch", "bed",
    "dining table", "toilet", "tv", "tie", "teddy bear"]


@pytest.fixture(autouse=True)
def standin_synonyms(monkeypatch):
    """Every test reads the stand-in list (never a cached copy of the published one)."""
    monkeypatch.setenv("MECHLIB_CHAIR_SYNONYMS", str(STANDIN))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline, with an empty mechlib cache; any socket connection attempt fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"a test tried to open a network connection: {a}")

    monkeypatch.setenv("MECHLIB_OFFLINE", "1")
    monkeypatch.setenv("MECHLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path / "cache"


# --- the synonym list and the text rules ---------------------------------------------------------


def test_synonym_list_is_read_as_chair_py_reads_it():
    vocab = vocabulary()
    inst = json.loads((COCO / "annotations" / "instances_val2014.json").read_text())
    assert list(vocab.categories) == STANDIN_CATEGORIES                       # file order, comments skipped
    assert set(vocab.categories) <= {c["name"] for c in inst["categories"]}   # all COCO names
    assert vocab.synonyms["puppy"] == "dog" and vocab.synonyms["sofa"] == "couch" and vocab.synonyms["people"] == "person"
    assert vocab.synonyms["dining table"] == "dining table" and vocab.synonyms["table"] == "dining table"
    # chair.py's parsing keeps a leading space: " motor bike" (after ",  ") can never match a word
    assert vocab.synonyms[" motor bike"] == "motorcycle" and "motor bike" not in vocab.synonyms
    assert not any(w.startswith("#") for w in vocab.synonyms)
    assert vocab.source == str(STANDIN.resolve()) and not vocab.published
    assert vocab.sha256 == hashlib.sha256(STANDIN.read_bytes()).hexdigest()
    assert vocabulary(synonyms=STANDIN) is vocab                              # parsed once per file


def test_synonym_files_in_the_list_format(tmp_path):
    """Any list in chair.py's format works (later lines win, as in chair.py's dict); bad files say so."""
    f = tmp_path / "mine.txt"
    f.write_text("# my list\n\ndog, puppy, pup\ncat, kitten, pup\n")
    v = vocabulary(synonyms=f)
    assert v.categories == ("dog", "cat") and v.synonyms["pup"] == "cat" and v.synonyms["puppy"] == "dog"
    assert caption_objects("Two pups and a puppy.", synonyms=f).objects == ("cat", "dog")
    f.write_text("horse, pony\n")                                               # an edited file is re-read
    os.utime(f, ns=(1, 1))
    assert vocabulary(synonyms=f).categories == ("horse",)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*no category"):
        vocabulary(synonyms=tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00dog")
    with pytest.raises(ValueError, match=r"bin\.txt.*UTF-8"):
        vocabulary(synonyms=tmp_path / "bin.txt")
    with pytest.raises(DatasetNotAvailable, match=r"synonyms=.*nowhere\.txt.*no file.*LisaAnne/Hallucination"):
        evals.chair(["a dog"], [["dog"]], synonyms=tmp_path / "nowhere.txt")


def test_singularize_equals_pattern_36_on_every_word_that_matters():
    ref = json.loads((FIX / "pattern_singularize.json").read_text())["pairs"]
    # the table covers every entry of the stand-in list and its regular plurals, and the tests' words
    entries = {w for line in STANDIN.read_text().splitlines() if line and not line.startswith("#")
               for w in line.strip().split(", ")}
    plurals = {w + "s" for w in entries} | {w + "es" for w in entries if w.endswith(("s", "x", "z", "ch", "sh"))}
    assert entries | plurals <= set(ref) and len(ref) > 300
    wrong = {w: (_text.singularize(w), s) for w, s in ref.items() if _text.singularize(w) != s}
    assert not wrong
    # the quirks CHAIR's numbers depend on
    assert [_text.singularize(w) for w in ("glass", "glasses", "bus", "buses", "ties", "people", "doggies", "skis")] == \
        ["glas", "glass", "bu", "bus", "ty", "person", "doggies", "ski"]


def test_word_tokenize_treebank_conventions():
    tok = _text.word_tokenize
    assert tok("a dog's bowl, and two cats.") == ["a", "dog", "'s", "bowl", ",", "and", "two", "cats", "."]
    assert tok("a dog. a cat! a man") == ["a", "dog", ".", "a", "cat", "!", "a", "man"]  # every sentence's period
    assert tok("a hot-dog stand") == ["a", "hot-dog", "stand"]                            # hyphens never split
    assert tok("1. a cat (white) cannot sit") == ["1.", "a", "cat", "(", "white", ")", "can", "not", "sit"]
    assert tok('he said "a cat"') == ["he", "said", "``", "a", "cat", "''"]


# --- CHAIR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption, objects", [
    ("Two puppies and three kittens on a sofa.", ("dog", "cat", "couch")),                # plurals + synonyms
    ("A hot dog and two teddy bears by a stop sign.", ("hot dog", "teddy bear", "stop sign")),  # compounds
    ("A baby elephant next to a baby.", ("elephant", "person")),                           # 'baby X' is the animal
    ("The passenger train and a passenger.", ("train", "person")),
    ("A toilet seat.", ("toilet",)),                                                       # not a chair
    ("The seat of the toilet is up.", ("toilet",)),
    ("A seat by the window.", ("chair",)),
    ("A wine glass and two wine glasses.", ("wine glass", "wine glass")),                  # pattern's 'glas'
    ("A man in a bow tie.", ("person", "tie")),
    ("A bus and two buses.", ("bus",)),                                                    # singularize('bus') == 'bu'
    ("A motor bike and a motorbike.", ("motorcycle",)),                                    # ' motor bike' never matches
    ("A hot-dog stand.", ()),
    ("A dog, a dog and another dog.", ("dog", "dog", "dog")),                              # every mention kept
])
def test_caption_objects_known_answers(caption, objects):
    assert caption_objects(caption).objects == objects


def test_chair_known_answers_from_the_definition():
    caps = ["A man and a woman ride horses past a dog.",   # person, person, horse, dog(h)
            "A cat sleeps on a bed.",                       # cat, bed
            "Two dogs and another dog near a car."]         # dog(h), dog(h), car
    gt = [["person", "horse"], ["cat", "bed", "tv"], ["car"]]
    r = evals.chair(caps, gt)
    assert r.chair_s == pytest.approx(2 / 3)
    assert r.chair_i == pytest.approx(3 / 9)               # mentions: 4 + 2 + 3, hallucinated 1 + 0 + 2
    assert (r.n_mentions, r.n_hallucinated, r.n_captions) == (9, 3, 3)
    assert r.recall == pytest.approx(5 / 6)                 # person, horse | cat, bed (not tv) | car
    assert r.per_caption[2].hallucinated == (("dog", "dog"), ("dog", "dog"))
    assert r.per_caption[2].hallucinated_objects == ("dog",)
    assert [c.chair_s for c in r.per_caption] == [1, 0, 1]
    assert r.per_caption[0].chair_i == pytest.approx(1 / 4)
    assert r.summary() == f"66.67 / 33.33 (recall 83.3; {r.mean_length:.0f} words)"
    u = evals.chair(caps, gt, count="unique")               # each category once per caption
    assert u.chair_s == pytest.approx(2 / 3) and u.chair_i == pytest.approx(2 / 7)
    # ground truth given by synonyms or COCO names is the same; a mapping needs image ids
    assert evals.chair(caps, [["man", "pony"], ["kitten", "bed", "television"], ["automobile"]]).chair_i == r.chair_i
    m = evals.chair(caps, {7: ["person", "horse"], 8: ["cat", "bed", "tv"], 9: ["car"]}, image_ids=[7, 8, 9])
    assert (m.chair_s, m.chair_i) == (r.chair_s, r.chair_i) and m.per_caption[1].image_id == 8


def test_chair_errors_name_the_input():
    with pytest.raises(ValueError, match=r"objects\[1\].*'tree'.*26 COCO categories.*chair_synonyms_standin"):
        evals.chair(["a dog", "a tree"], [["dog"], ["tree"]])
    with pytest.raises(ValueError, match="2 entries for 1 captions"):
        evals.chair(["a dog"], [["dog"], ["cat"]])
    with pytest.raises(ValueError, match="image_ids"):
        evals.chair(["a dog"], {1: ["dog"]})
    with pytest.raises(KeyError, match=r"\[2\]"):
        evals.chair(["a dog"], {1: ["dog"]}, image_ids=[2])
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        evals.chair(["a dog", None], [["dog"], ["dog"]])
    with pytest.raises(ValueError, match="rules"):
        evals.chair(["a dog"], [["dog"]], rules="wordnet")


def test_coco_ground_truth_is_instances_plus_caption_mentions():
    ann = COCO / "annotations"
    only_instances = evals.coco_ground_truth(ann / "instances_val2014.json")
    gt = evals.coco_ground_truth(ann / "instances_val2014.json", ann / "captions_val2014.json")
    assert only_instances[101] == {"person"}
    assert gt[101] == {"person", "orange"}      # "an orange suit" in a reference caption: CHAIR's own rule
    assert gt[103] == {"cup", "spoon", "dining table"}
    assert gt[105] == {"motorcycle", "bench", "bicycle", "bottle"}
    assert set(evals.coco_ground_truth(ann / "instances_val2014.json", image_ids=[102, 999])) == {102, 999}
    r = evals.chair(["A cat on a couch.", "A man with an orange."], gt, image_ids=[102, 101])
    assert r.per_caption[0].hallucinated_objects == ("couch",) and r.per_caption[1].hallucinated == ()


def test_coco_ground_truth_needs_every_annotated_category(tmp_path):
    no_spoon = tmp_path / "no_spoon.txt"
    no_spoon.write_text("\n".join(ln for ln in STANDIN.read_text().splitlines() if not ln.startswith("spoon")))
    ann = COCO / "annotations"
    with pytest.raises(ValueError, match=r"image 103.*'spoon'.*no_spoon\.txt"):
        evals.coco_ground_truth(ann / "instances_val2014.json", synonyms=no_spoon)
    gt = evals.coco_ground_truth(ann / "instances_val2014.json", image_ids=[101, 102], synonyms=no_spoon)
    assert gt == {101: {"person"}, 102: {"cat"}}
    with pytest.raises(ValueError, match=r"image 103.*'spoon'.*no_spoon\.txt"):
        evals.load_coco(root=COCO, image_ids=[103], images=False, synonyms=no_spoon)


def test_docstring_examples_hold_on_the_stand_in():
    """The examples in chair.py's docstrings use only words of the stand-in list."""
    res = doctest.testmod(chair_module, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 4 and res.failed == 0


def test_chair_result_saves_atomically_and_tabulates(tmp_path):
    r = evals.chair(["A dog on a bed.", "A cat."], [["dog"], ["cat"]])
    path = r.save(tmp_path / "chair.json")
    doc = json.loads(path.read_text())
    assert doc["overall"]["CHAIR_S"] == 0.5 and doc["sentences"][0]["hallucinated"] == [["bed", "bed"]]
    assert [p.name for p in tmp_path.iterdir()] == ["chair.json"]
    df = r.to_dataframe()
    assert list(df["chair_s"]) == [1, 0]


# --- POPE ----------------------------------------------------------------------------------------

GT = {"A": ["person", "dog", "frisbee"], "B": ["person", "car", "dog"], "C": ["cat", "couch", "tv"],
      "D": ["person", "car", "bus"], "E": ["person", "cat", "tv"], "F": ["apple", "bowl"]}


@pytest.mark.parametrize("setting", ["random", "popular", "adversarial"])
def test_pope_sets_are_balanced_and_negatives_absent(setting):
    qs = evals.pope_questions(GT, n=None, setting=setting, seed=3)
    assert len(qs) == 2 * 3 * 5                              # F has only 2 objects: never chosen
    assert {q.image_id for q in qs} == set("ABCDE")
    assert [q.label for q in qs] == ["yes", "no"] * 15          # interleaved, balanced
    assert [q.question_id for q in qs] == list(range(1, 31))
    for im in "ABCDE":
        mine = [q for q in qs if q.image_id == im]
        assert [q.object for q in mine if q.is_positive] == GT[im]            # the first 3, in order
        negs = [q.object for q in mine if not q.is_positive]
        assert len(set(negs)) == 3 and not set(negs) & set(GT[im])            # never in the image
        assert set(negs) <= {o for objs in GT.values() for o in objs} - {"apple", "bowl"}
    assert qs[1].text == f"Is there a {qs[1].object} in the image?"


def test_pope_popular_takes_the_most_frequent_absent_objects():
    qs = evals.pope_questions(GT, n=None, setting="popular")
    # frequency over the chosen images: person 4; dog, car, cat, tv 2 (first-seen order); the rest 1
    c = [(q.object, q.label) for q in qs if q.image_id == "C"]
    assert c == [("cat", "yes"), ("person", "no"), ("couch", "yes"), ("dog", "no"), ("tv", "yes"), ("car", "no")]
    a = [q.object for q in qs if q.image_id == "A" and not q.is_positive]
    assert a == ["car", "cat", "tv"]


def test_pope_adversarial_takes_the_most_co_occurring_absent_objects():
    qs = evals.pope_questions(GT, n=None, setting="adversarial", seed=0)
    e = [q.object for q in qs if q.image_id == "E"]
    # person co-occurs with dog 2, car 2, frisbee 1, bus 1, cat 1, tv 1 -> dog; cat with tv 2, couch 1,
    # person 1 -> tv is in E, so couch; tv's co-occurring objects are all in E or asked -> random fallback
    assert e[:4] == ["person", "dog", "cat", "couch"]
    assert e[5] not in GT["E"] + ["dog", "couch"]


def test_pope_sampling_is_seeded_and_checked():
    a = evals.pope_questions(GT, n=3, setting="random", seed=1)
    assert a == evals.pope_questions(GT, n=3, setting="random", seed=1)
    runs = {tuple((q.image_id, q.object) for q in evals.pope_questions(GT, n=3, setting="random", seed=s)) for s in range(8)}
    assert len(runs) > 1
    assert len({q.image_id for q in a}) == 3
    with pytest.raises(ValueError, match="only 5 of 6 images"):
        evals.pope_questions(GT, n=6)
    with pytest.raises(ValueError, match="setting"):
        evals.pope_questions(GT, setting="hard")
    q = evals.pope_questions({1: ["apple", "orange", "umbrella"], 2: ["person", "car", "dog"]}, n=None, seed=0)
    assert q[0].text == "Is there an apple in the image?"


def test_pope_answer_parsing_is_popes_rule():
    yes = ["Yes, there is a dog.", "Yes", "", "There is a cat. No doubt.", "NO", "Nothing here"]
    no = ["No.", "No, there is not.", "There is no dog in the image.", "I do not see one", "no,"]
    assert [evals.pope_answer(a) for a in yes] == [True] * len(yes)
    assert [evals.pope_answer(a) for a in no] == [False] * len(no)


def test_pope_scores_on_a_hand_computed_confusion_matrix():
    # TP 3, FN 2 (labels yes); FP 1, TN 4 (labels no)
    labels = ["yes"] * 5 + ["no"] * 5
    answers = ["Yes.", "yes", "Yes, there is.", "No.", "There is no such object."] + ["Yes"] + ["No"] * 4
    s = evals.pope_scores(answers, labels)
    assert (s.tp, s.fn, s.fp, s.tn) == (3, 2, 1, 4)
    assert s.accuracy == pytest.approx(0.7) and s.precision == pytest.approx(0.75)
    assert s.recall == pytest.approx(0.6) and s.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert s.yes_ratio == pytest.approx(0.4)
    qs = evals.pope_questions(GT, n=None, seed=0)
    always_yes = evals.pope_scores([True] * len(qs), qs)
    assert (always_yes.accuracy, always_yes.recall, always_yes.yes_ratio) == (0.5, 1.0, 1.0)
    assert always_yes.f1 == pytest.approx(2 / 3)
    with pytest.warns(UserWarning, match="precision"):
        none = evals.pope_scores([0, 0], [1, 0])
    assert math.isnan(none.precision) and none.accuracy == 0.5
    with pytest.raises(ValueError, match="3 answers for 2 labels"):
        evals.pope_scores(["yes"] * 3, ["yes", "no"])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        evals.pope_scores(["yes"], ["maybe"])


# --- loaders -------------------------------------------------------------------------------------


def test_load_coco_from_a_local_folder(no_network):
    recs = evals.load_coco(3, root=COCO, seed=0)
    assert recs == evals.load_coco(3, root=COCO, seed=0)
    assert len(recs) == 3 and {r.image_id for r in recs} <= {101, 102, 103, 104, 105}
    assert {tuple(r.image_id for r in evals.load_coco(3, root=COCO, seed=s)) for s in range(6)} != {tuple(r.image_id for r in recs)}
    (moto,) = evals.load_coco(root=COCO, image_ids=[105])
    assert moto.categories == ("motorcycle", "bench", "bicycle", "bottle")     # POPE's objects, deduplicated
    assert moto.objects == {"motorcycle", "bench", "bicycle", "bottle"}        # CHAIR's ground truth
    assert len(moto.captions) == 2
    im = moto.image()
    assert im.mode == "RGB" and im.size == (96, 65)
    (astro,) = evals.load_coco(root=COCO, image_ids=[101], images=False)
    assert astro.path is None and astro.objects == {"person", "orange"}
    with pytest.raises(ValueError, match="images=False"):
        astro.image()
    index = no_network / "datasets" / "coco" / "index_val2014.json"
    assert index.is_file() and not [p for p in index.parent.iterdir() if p.name.endswith((".tmp", ".part"))]
    # records feed POPE and CHAIR directly
    qs = evals.pope_questions(evals.load_coco(None, root=COCO, images=False), n=None, per_image=3)
    assert {q.image_id for q in qs} == {103, 105}


def test_load_coco_offline_names_the_file_and_does_not_wait(no_network, tmp_path):
    t = time.perf_counter()
    with pytest.raises(DatasetNotAvailable, match=r"captions_val2014\.json.*" + str(no_network / "datasets" / "coco")):
        evals.load_coco(10)
    ann_only = tmp_path / "ann"
    shutil.copytree(COCO / "annotations", ann_only / "annotations")
    with pytest.raises(DatasetNotAvailable, match=r"COCO_val2014_000000000102\.jpg.*offline"):
        evals.load_coco(root=ann_only, image_ids=[102])
    with pytest.raises(DatasetNotAvailable, match="not a folder"):
        evals.load_coco(root=tmp_path / "nowhere")
    assert len(evals.load_coco(root=ann_only, image_ids=[102], images=False)) == 1
    assert time.perf_counter() - t < 5


def test_online_check_is_bounded_and_respects_offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("online() tried to connect although MECHLIB_OFFLINE=1")

    def hang(*a, **k):  # a resolver that never answers
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setenv("MECHLIB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert online("mechlib-test.invalid") is False
    monkeypatch.delenv("MECHLIB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", hang)
    t = time.perf_counter()
    assert online("mechlib-hang.invalid", timeout=0.2) is False
    assert time.perf_counter() - t < 2


def test_act_datasets_local_and_offline(no_network):
    ds = evals.load_act_dataset("sst2", root=TEXT / "act")
    assert len(ds) == 4 and ds.labels == [1, 0, 1, 0] and ds.label_choices == (" negative", " positive")
    assert ds.prompts[0] == ds.instruction + "Sentence: a warm , funny and moving film . \nSentiment: "
    assert ds.instruction.startswith("Classify the sentiment of the user's message")
    trec = evals.load_act_dataset("trec", root=TEXT / "act")                  # TREC's label is coarse_label
    assert trec.name == "TREC" and trec.labels == [3, 5] and trec.split == "test"
    assert evals.load_act_dataset("sst2", root=TEXT / "act", n=2, seed=0) == evals.load_act_dataset("sst2", root=TEXT / "act", n=2, seed=0)
    with pytest.raises(DatasetNotAvailable, match=r"act/MR/validation\.jsonl.*offline|offline.*act/MR/validation\.jsonl"):
        evals.load_act_dataset("MR")
    with pytest.raises(ValueError, match="ACT's classification datasets"):
        evals.load_act_dataset("imdb")
    assert set(evals.ACT_DATASETS) == {"sst2", "sst5", "MR", "SUBJ", "AGNews", "TREC", "CB", "BoolQ", "DBPedia"}


def test_perplexity_and_rewardbench_local_and_offline(no_network):
    wiki = evals.load_perplexity_text("wikitext2", root=TEXT)
    lines = (TEXT / "wiki.test.raw").read_text().splitlines(keepends=True)
    assert wiki == "\n\n".join(lines) and "Test Article" in wiki
    assert evals.load_perplexity_text("c4", root=TEXT) == "First web document for the test. Second web document. Third one."
    with pytest.raises(DatasetNotAvailable, match=r"wiki\.test\.raw"):
        evals.load_perplexity_text("wikitext2")
    rb = evals.load_rewardbench(root=TEXT / "rewardbench")
    assert [r["subset"] for r in rb] == ["math-prm", "hep-python", "hep-go"]
    assert len(evals.load_rewardbench(root=TEXT / "rewardbench", subsets="all")) == 4
    assert rb[0]["chosen"] == "2 + 3 = 5."
    with pytest.raises(DatasetNotAvailable, match=r"filtered\.jsonl"):
        evals.load_rewardbench()


def test_import_is_light():
    code = ("import sys, mechlib.evals; heavy = [m for m in ('PIL', 'datasets', 'nltk') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MECHLIB_OFFLINE": "1"}).stdout.strip()
    assert out == "[]"


def test_opera_rules_need_nltk_data_and_say_so():
    """OPERA's variant (WordNet lemmas) runs where nltk and its data are installed, else says how."""
    try:
        objs = caption_objects("Two dogs on the train tracks.", rules="opera").objects
    except (ImportError, LookupError) as e:
        assert "nltk" in str(e) and "download" in str(e)
    else:
        assert objs == ("dog",)  # OPERA adds "train track" as a compound, so no train


def test_load_coco_download_path_with_local_urls(no_network, monkeypatch, tmp_path):
    """The download branch (zip of annotations, images one by one, atomic writes), fed file:// URLs."""
    import zipfile

    from mechlib.evals import coco as cm

    z = tmp_path / "annotations_trainval2014.zip"
    with zipfile.ZipFile(z, "w") as f:
        for n in ("captions_val2014.json", "instances_val2014.json"):
            f.write(COCO / "annotations" / n, f"annotations/{n}")
    monkeypatch.setattr(cm, "online", lambda *a, **k: True)
    monkeypatch.setattr(cm, "COCO_ANNOTATIONS_URL", z.as_uri())
    monkeypatch.setattr(cm, "COCO_IMAGE_URL", "file://" + str(COCO.resolve()) + "/{split}/{file_name}")
    recs = evals.load_coco(2, seed=1)
    coco = no_network / "datasets" / "coco"
    assert sorted(p.name for p in (coco / "annotations").iterdir()) == ["captions_val2014.json", "instances_val2014.json"]
    assert sorted(p.name for p in (coco / "val2014").iterdir()) == sorted(r.file_name for r in recs)
    assert all(r.path.parent == coco / "val2014" and r.image().size[0] == 96 for r in recs)
    assert not (coco / "annotations_trainval2014.zip").exists()
    monkeypatch.setattr(cm, "online", lambda *a, **k: False)       # now cached: works offline
    assert evals.load_coco(2, seed=1) == recs


# --- CHAIR's synonym list: argument, environment, cache, download ---------------------------------


def test_synonym_list_offline_names_the_file_and_where_to_place_it(no_network, monkeypatch):
    monkeypatch.delenv("MECHLIB_CHAIR_SYNONYMS")
    cache = no_network / "datasets" / "chair" / "synonyms.txt"
    assert ds.chair_synonyms_cache() == cache
    t = time.perf_counter()
    for call in (lambda: evals.chair(["a dog"], [["dog"]]), lambda: evals.caption_objects("a dog"),
                 lambda: evals.coco_ground_truth(COCO / "annotations" / "instances_val2014.json"),
                 lambda: evals.load_coco(None, root=COCO, images=False), evals.chair_synonyms_path):
        with pytest.raises(DatasetNotAvailable) as e:
            call()
        msg = str(e.value)
        assert "offline" in msg and "data/synonyms.txt of github.com/LisaAnne/Hallucination" in msg
        assert "6e4d33c4bedf6dfcd24c61bf527f40714717be47" in msg and ds.CHAIR_SYNONYMS_URL in msg
        assert str(cache) in msg and "synonyms=" in msg and "MECHLIB_CHAIR_SYNONYMS" in msg
    assert time.perf_counter() - t < 5
    with pytest.raises(DatasetNotAvailable, match=r"download=False.*" + str(cache)):
        ds.chair_synonyms_path(download=False)
    assert not (no_network / "datasets" / "chair").exists()
    assert ds.CHAIR_SYNONYMS_URL == ("https://raw.githubusercontent.com/LisaAnne/Hallucination/"
                                     "6e4d33c4bedf6dfcd24c61bf527f40714717be47/data/synonyms.txt")


def test_synonym_list_lookup_order(no_network, monkeypatch, tmp_path):
    """synonyms= beats $MECHLIB_CHAIR_SYNONYMS, which beats the cache; the cache must be the published file."""
    mine = tmp_path / "mine.txt"
    mine.write_text("dog, puppy\n")
    assert ds.chair_synonyms_path() == STANDIN                               # the environment (autouse)
    assert ds.chair_synonyms_path(mine) == mine                              # the argument first
    assert evals.chair(["a puppy and a cat"], [["dog"]], synonyms=mine).n_mentions == 1   # no cat in mine
    with pytest.raises(DatasetNotAvailable, match=r"\$MECHLIB_CHAIR_SYNONYMS=.*missing\.txt.*no file"):
        monkeypatch.setenv("MECHLIB_CHAIR_SYNONYMS", str(tmp_path / "missing.txt"))
        ds.chair_synonyms_path()
    monkeypatch.delenv("MECHLIB_CHAIR_SYNONYMS")
    cache = ds.chair_synonyms_cache()
    cache.parent.mkdir(parents=True)
    shutil.copy(STANDIN, cache)                                               # not the published list
    with pytest.raises(DatasetNotAvailable, match=r"synonyms\.txt is not CHAIR's published synonym list.*sha256"):
        ds.chair_synonyms_path()
    monkeypatch.setattr(ds, "CHAIR_SYNONYMS_SHA256", hashlib.sha256(STANDIN.read_bytes()).hexdigest())
    assert ds.chair_synonyms_path() == cache                                  # the cache, checked, offline
    r = evals.chair(["A puppy on a sofa."], [["dog"]])
    assert r.metadata["synonyms"] == str(cache.resolve()) and r.metadata["synonyms_published"] is True
    assert "published" not in repr(r) and r.chair_s == 1.0


def test_synonym_list_download_is_checked_and_cached(no_network, monkeypatch, tmp_path):
    """The download branch on a file:// URL serving the stand-in: sha256-checked, atomic, then offline."""
    monkeypatch.delenv("MECHLIB_CHAIR_SYNONYMS")
    cache = ds.chair_synonyms_cache()
    monkeypatch.setattr(ds, "online", lambda *a, **k: True)
    monkeypatch.setattr(ds, "CHAIR_SYNONYMS_URL", STANDIN.resolve().as_uri())
    # the real hash: the stand-in is not the published file -> a clear error, nothing cached
    with pytest.raises(DatasetNotAvailable, match=r"sha256 5626f958.*not b685537b.*nothing was cached.*Place data/synonyms"):
        evals.chair(["a dog"], [["dog"]])
    assert not cache.parent.exists() or not list(cache.parent.iterdir())
    # an unreachable URL while "online": the error names the URL and what to place
    monkeypatch.setattr(ds, "CHAIR_SYNONYMS_URL", (tmp_path / "gone.txt").as_uri())
    with pytest.raises(DatasetNotAvailable, match=r"gone\.txt failed.*" + str(cache)):
        ds.chair_synonyms_path()
    assert not cache.parent.exists() or not list(cache.parent.iterdir())
    # with the hash of the served file: downloaded once, cached byte for byte, no temp file left
    monkeypatch.setattr(ds, "CHAIR_SYNONYMS_URL", STANDIN.resolve().as_uri())
    monkeypatch.setattr(ds, "CHAIR_SYNONYMS_SHA256", hashlib.sha256(STANDIN.read_bytes()).hexdigest())
    assert ds.chair_synonyms_path() == cache
    assert cache.read_bytes() == STANDIN.read_bytes() and [p.name for p in cache.parent.iterdir()] == ["synonyms.txt"]
    fetched = []
    monkeypatch.setattr(ds, "online", lambda *a, **k: fetched.append(1) or False)   # now offline
    r = evals.chair(["Two puppies on a sofa."], [["dog"]])
    assert r.n_mentions == 2 and r.per_caption[0].hallucinated_objects == ("couch",) and not fetched


def test_hub_path_caches_a_plain_copy(no_network, monkeypatch):
    """With the network, rows come from `datasets.load_dataset` and are cached for offline use."""
    import importlib.machinery
    import types

    from mechlib.evals import datasets as ds

    calls = []
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        return [{"sentence": "good .", "label": 1, "idx": 0}, {"sentence": "bad .", "label": 0, "idx": 1}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(ds, "online", lambda *a, **k: True)
    a = evals.load_act_dataset("sst2")
    assert calls == [("nyu-mll/glue", "sst2", "validation")] and a.labels == [1, 0]
    monkeypatch.setattr(ds, "online", lambda *a, **k: False)
    assert evals.load_act_dataset("sst2") == a and len(calls) == 1
    assert (no_network / "datasets" / "act" / "sst2" / "validation.jsonl").is_file()


def test_pope_mean_is_the_mean_of_each_settings_scores_not_the_pooled_answers():
    a = evals.pope_scores(["yes", "no", "no", "no"], ["yes", "no", "yes", "no"])    # acc 3/4, F1 2/3
    b = evals.pope_scores(["yes", "yes"], ["yes", "no"])                            # acc 1/2, F1 2/3
    m = evals.pope_mean({"random": a, "adversarial": b})
    assert m.settings == ("random", "adversarial")
    assert m.accuracy == pytest.approx((3 / 4 + 1 / 2) / 2) and m.f1 == pytest.approx(2 / 3)
    assert m.yes_ratio == pytest.approx((1 / 4 + 1) / 2)
    pooled = evals.pope_scores(["yes", "no", "no", "no", "yes", "yes"], ["yes", "no", "yes", "no", "yes", "no"])
    assert m.accuracy != pytest.approx(pooled.accuracy)   # 0.625 vs 4/6
    assert m.summary() == "62.50 / 66.67 (yes-ratio 62%)" and a.summary(1) == "75.0 / 66.7 (yes-ratio 25%)"
    with pytest.raises(ValueError, match="at least one setting"):
        evals.pope_mean({})
    with pytest.raises(TypeError, match="not PopeScores"):
        evals.pope_mean({"random": 0.5})
