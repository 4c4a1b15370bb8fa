import pytest
import torch

from mechlib import ContrastSet, ContrastSetError, metrics, tasks

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORR = "When Mary and John went to the store, Mary gave a drink to"


def test_from_prompts_tokenizes_like_to_tokens(tiny_llama):
    cs = ContrastSet.from_prompts(tiny_llama, [IOI_CLEAN], [IOI_CORR], [" Mary"], [" John"])
    assert torch.equal(cs.clean_tokens[0], tiny_llama.to_tokens(IOI_CLEAN)[0])
    assert cs.clean_tokens[0, 0] == tiny_llama.tokenizer.bos_token_id
    assert int(cs.last_pos[0]) == cs.n_pos - 1 and cs.same_length


def test_mismatched_lengths_name_the_prompt(model):
    with pytest.raises(ContrastSetError, match=r"prompt 1: clean has \d+ tokens but corrupted has"):
        ContrastSet.from_prompts(model, [IOI_CLEAN, IOI_CLEAN], [IOI_CORR, "When Mary went"],
                                 [" Mary", " Mary"], [" John", " John"])


def test_multi_token_answer_names_the_prompt(model):
    with pytest.raises(ContrastSetError, match=r"prompt 0 .*answers\[0\] ' Wolfeschlegelstein' is \d+ tokens"):
        ContrastSet.from_prompts(model, [IOI_CLEAN], [IOI_CORR], [" Wolfeschlegelstein"], [" John"])
    with pytest.raises(ContrastSetError, match="leading space"):
        ContrastSet.from_prompts(model, [IOI_CLEAN], [IOI_CORR], ["Christophers"], [" John"])


def _sentencepiece_tokenizer(dummy_prefix: bool):
    """A SentencePiece-style tokenizer as Llama-2's in transformers' legacy mode (``dummy_prefix``:
    a '▁' before the text and every space as '▁', so " Paris" alone is '▁' + '▁Paris'), or one that
    splits a bare ' ' off the word (no word-boundary marker in its tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if dummy_prefix:
        pieces = ["<unk>", "\u2581", "\u2581Paris", "\u2581The", "\u2581capital", "\u2581is", "\u2581Rome",
                  "P", "a", "r", "i", "s", "R", "o", "m", "e"]
        tk = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -10.0) for p in pieces], unk_id=0))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        vocab = {w: i for i, w in enumerate(["<unk>", " ", "Paris", "The", "capital", "is"])}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_single_token_answers_on_a_sentencepiece_vocabulary_with_a_dummy_prefix():
    from types import SimpleNamespace

    from mechlib.tasks.contrast import single_token_id

    tok = _sentencepiece_tokenizer(dummy_prefix=True)
    model = SimpleNamespace(tokenizer=tok)
    # alone, " Paris" is two tokens; in running text the word is the one token '▁Paris'
    assert tok.convert_ids_to_tokens(tok.encode(" Paris", add_special_tokens=False)) == ["\u2581", "\u2581Paris"]
    in_text = tok.encode("The capital is Paris", add_special_tokens=False)
    assert single_token_id(model, " Paris") == in_text[-1] == tok.convert_tokens_to_ids("\u2581Paris")
    assert single_token_id(model, "Paris") == in_text[-1]  # the dummy prefix makes the bare word the same token
    with pytest.raises(ContrastSetError, match="is 3 tokens"):  # a word of two pieces stays more than one
        single_token_id(model, " Pa")
    with pytest.raises(ContrastSetError):
        single_token_id(model, "  Paris")  # two spaces are not running text


def test_a_bare_space_token_before_the_word_is_not_read_as_a_dummy_prefix():
    """A vocabulary whose words carry no boundary marker: after a prompt " Paris" is ' ' then 'Paris',
    so 'Paris' alone is not the answer token."""
    from types import SimpleNamespace

    from mechlib.tasks.contrast import single_token_id

    tok = _sentencepiece_tokenizer(dummy_prefix=False)
    assert tok.convert_ids_to_tokens(tok.encode(" Paris", add_special_tokens=False)) == [" ", "Paris"]
    with pytest.raises(ContrastSetError, match="is 2 tokens"):
        single_token_id(SimpleNamespace(tokenizer=tok), " Paris")


@pytest.mark.parametrize("field", ["clean", "corrupted", "answers", "wrong_answers"])
def test_empty_strings_are_refused(tiny_llama, field):
    args = dict(clean=[IOI_CLEAN, IOI_CLEAN], corrupted=[IOI_CORR, IOI_CORR],
                answers=[" Mary", " Mary"], wrong_answers=[" John", " John"])
    args[field][1] = "  "
    with pytest.raises(ContrastSetError, match=rf"{field}\[1\] is empty"):
        ContrastSet.from_prompts(tiny_llama, **args)


def test_list_length_and_type_errors(tiny_llama):
    with pytest.raises(ContrastSetError, match="corrupted has 1 entries but clean has 2"):
        ContrastSet.from_prompts(tiny_llama, [IOI_CLEAN] * 2, [IOI_CORR], [" Mary"] * 2, [" John"] * 2)
    with pytest.raises(ContrastSetError, match="single string"):
        ContrastSet.from_prompts(tiny_llama, IOI_CLEAN, [IOI_CORR], [" Mary"], [" John"])
    with pytest.raises(ContrastSetError, match="at least one"):
        ContrastSet.from_prompts(tiny_llama, [], [], [], [])


def test_padding_never_shifts_the_answer_position(model):
    """Mixed lengths in one set: each prompt's metric equals the metric of that prompt alone."""
    clean = ["The capital of France is", IOI_CLEAN, "Then, Tom and Amy had a long argument, and afterwards Tom said to"]
    corr = ["The capital of Italy is", IOI_CORR, "Then, Tom and Amy had a long argument, and afterwards Amy said to"]
    ans, wrong = [" Paris", " Mary", " Amy"], [" Rome", " John", " Tom"]
    cs = ContrastSet.from_prompts(model, clean, corr, ans, wrong)
    assert not cs.same_length and len(set(cs.lengths.tolist())) == 3
    together = metrics.evaluate(model, cs, metrics.logit_diff(cs))
    for i in range(3):
        alone = ContrastSet.from_prompts(model, clean[i:i + 1], corr[i:i + 1], ans[i:i + 1], wrong[i:i + 1])
        single = metrics.evaluate(model, alone, metrics.logit_diff(alone))
        assert torch.allclose(together[i], single[0], atol=1e-4), (i, together[i], single[0])
    # pads are really there: the shortest prompt's row ends in pad tokens
    short = int(cs.lengths.argmin())
    assert (cs.clean_tokens[short, int(cs.lengths[short]):] == cs.pad_id).all()


def test_subset_trims_and_keeps_alignment(model):
    cs = tasks.factual_recall(model)
    sub = cs.subset([2, 0])
    assert sub.clean_prompts == (cs.clean_prompts[2], cs.clean_prompts[0])
    assert torch.equal(sub.answer_ids, cs.answer_ids[[2, 0]])
    assert sub.n_pos == int(cs.lengths[[2, 0]].max())
    with pytest.raises(ContrastSetError, match="out of range"):
        cs.subset([len(cs)])


def test_ioi_set_shows_a_clear_effect_on_smollm2(model):
    cs = tasks.ioi(model, n=48, seed=0)
    assert set(cs.labels) == {"ABBA", "BABA"}
    md = metrics.logit_diff(cs)
    clean = metrics.evaluate(model, cs, md)
    corr = metrics.evaluate(model, cs, md, side="corrupted")
    print(f"IOI logit diff IO-S: clean {clean.mean():.2f}, corrupted {corr.mean():.2f}")
    assert clean.mean() >= 2.0
    assert corr.mean() <= 0.0
    assert (clean > 0).float().mean() > 0.85


def test_ioi_is_seeded_and_has_equal_lengths(model):
    a, b = tasks.ioi(model, n=8, seed=1), tasks.ioi(model, n=8, seed=1)
    assert a.clean_prompts == b.clean_prompts
    assert a.clean_prompts != tasks.ioi(model, n=8, seed=2).clean_prompts
    abc = tasks.ioi(model, n=8, seed=1, corruption="abc")
    assert abc.clean_prompts == a.clean_prompts and abc.corrupted_prompts != a.corrupted_prompts
    with pytest.raises(ValueError, match="corruption"):
        tasks.ioi(model, corruption="nope")


def test_colored_objects_and_factual_recall(model):
    co = tasks.colored_objects(model, n=8)
    assert all(p.endswith("A:") for p in co.clean_prompts)
    assert all(a != w for a, w in zip(co.answers, co.wrong_answers))
    fr = tasks.factual_recall(model)
    assert "The capital of France is" in fr.clean_prompts
    i = fr.clean_prompts.index("The capital of France is")
    assert fr.answers[i] == " Paris"
    ld = metrics.evaluate(model, fr, metrics.logit_diff(fr))
    assert (ld > 0).float().mean() > 0.8


def test_tasks_work_on_tiny_models(tiny_gpt2):
    cs = tasks.ioi(tiny_gpt2, n=4, templates=[0])
    assert cs.same_length and len(cs) == 4
    assert not tasks.ioi(tiny_gpt2, n=4).same_length  # templates differ in length
