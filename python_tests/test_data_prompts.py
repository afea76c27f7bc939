"""The RA-DIT template, its tokenisation and the collators, with the real SmolLM2 tokenizer."""
from __future__ import annotations

import doctest
import random

import pytest
import torch
from _fixtures import smollm2_tokenizer

from radit_fast.data import prompts
from radit_fast.data.prompts import (
    Instance,
    bucket_batches,
    build_instance,
    build_prompt,
    collate_packed,
    collate_padded,
    format_prompt,
    pack_rows,
    question_text,
)
from radit_fast.data.tasks import Example
from radit_fast.io import RaditError

CHUNK = ("Paris is the capital and most populous city of France. With an estimated population of "
         "2,102,650 residents in January 2023 in an area of more than 105 km2, Paris is the fourth-most "
         "populous city in the European Union.")


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _decode(tok, ids):
    return tok.decode(ids)


def test_doctests():
    assert doctest.testmod(prompts).failed == 0


def test_format_prompt_template():
    assert format_prompt(CHUNK, "Q?") == f"Background: {CHUNK}\n\nQ: Q?\nA:"
    assert format_prompt(None, "Q?") == "Q: Q?\nA:"
    assert format_prompt("  ", "Q?") == "Q: Q?\nA:"
    assert format_prompt("c", "q", shots=[("q1", "a1"), ("q2", "a2")], markers=("Question:", "A:")) == (
        "Background: c\n\nQuestion: q1\nA: a1\n\nQuestion: q2\nA: a2\n\nQuestion: q\nA:")


def test_instance_text_and_answer_boundary(tok):
    inst = build_instance(tok, CHUNK, "What is the capital of France?", "Paris", max_length=256)
    assert inst.answer_len >= 1 and inst.answer_start + inst.answer_len == inst.length
    assert _decode(tok, inst.input_ids[:inst.answer_start]) == format_prompt(CHUNK, "What is the capital of France?")
    assert _decode(tok, inst.answer_ids) == " Paris"
    assert inst.answer_ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert not inst.chunk_truncated and inst.chunk_tokens > 10
    # no chunk: no Background line
    bare = build_instance(tok, None, "What is the capital of France?", "Paris", max_length=256)
    assert _decode(tok, bare.input_ids) == "Q: What is the capital of France?\nA: Paris"
    assert bare.chunk_tokens == 0


def test_truncation_cuts_only_the_chunk(tok):
    q, a = "What is the capital of France?", "Paris, the City of Light"
    full = build_instance(tok, CHUNK, q, a, max_length=512)
    bare = build_instance(tok, None, q, a, max_length=512)
    header = len(tok("Background:", add_special_tokens=False)["input_ids"])
    chunk_ids = tok(" " + CHUNK, add_special_tokens=False)["input_ids"]
    for max_length in range(bare.length, full.length + 3):
        inst = build_instance(tok, CHUNK, q, a, max_length=max_length)
        assert inst.length <= max_length
        assert inst.answer_ids == full.answer_ids
        assert _decode(tok, inst.input_ids).endswith("\n\nQ: What is the capital of France?\nA: Paris, the City of Light") \
            or inst.input_ids == bare.input_ids
        if inst.chunk_tokens:
            # the kept chunk is a prefix of the chunk's tokens and fills the budget exactly when cut
            kept = inst.input_ids[header:header + inst.chunk_tokens]
            assert kept == chunk_ids[:inst.chunk_tokens]
            assert inst.chunk_truncated == (inst.chunk_tokens < len(chunk_ids))
            if inst.chunk_truncated:
                assert inst.length == max_length
        else:  # not even one chunk token fits: no background at all
            assert inst.input_ids == bare.input_ids and inst.chunk_truncated
    assert build_instance(tok, CHUNK, q, a, max_length=full.length).input_ids == full.input_ids


def test_too_long_question_names_the_example(tok):
    with pytest.raises(RaditError, match=r"example ex-7: question and answer alone take \d+ tokens.*--max-length 8"):
        build_instance(tok, CHUNK, "What is the capital of France?", "Paris", max_length=8, example_id="ex-7")
    with pytest.raises(RaditError, match="empty answer"):
        build_instance(tok, CHUNK, "q", "  ", max_length=64)


def test_markers_randomised_and_seeded(tok):
    def texts(seed):
        rng = random.Random(seed)
        return [_decode(tok, build_instance(tok, "c", "q", "a", max_length=64, rng=rng).input_ids) for _ in range(40)]

    a, b, c = texts(1), texts(1), texts(2)
    assert a == b and a != c
    seen = {(t.split(" q\n")[0].split("\n\n")[-1], t.split("\n")[-1].split(" ")[0]) for t in a}
    assert seen == {("Q:", "A:"), ("Q:", "Answer:"), ("Question:", "A:"), ("Question:", "Answer:")}
    # evaluation (no rng) is always Q:/A:
    assert _decode(tok, build_instance(tok, None, "q", "a", max_length=64).input_ids) == "Q: q\nA: a"


def test_shots_between_background_and_question(tok):
    shots = [("What is 1+1?", "2"), ("Capital of Peru?", "Lima")]
    inst = build_instance(tok, "Some text.", "Capital of Chile?", "Santiago", max_length=128, shots=shots)
    assert _decode(tok, inst.input_ids) == ("Background: Some text.\n\nQ: What is 1+1?\nA: 2\n\n"
                                            "Q: Capital of Peru?\nA: Lima\n\nQ: Capital of Chile?\nA: Santiago")
    prompt = build_prompt(tok, "Some text.", "Capital of Chile?", max_length=128, shots=shots)
    assert prompt.answer_len == 0 and prompt.input_ids == inst.input_ids[:inst.answer_start]


def test_bos_added_when_the_tokenizer_uses_one(tok):
    class WithBos:  # wraps the real tokenizer, adding a BOS like Llama-2's does
        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    wb = WithBos()
    assert prompts.special_prefix(wb) == [1]
    assert prompts.special_prefix(tok) == []
    inst = build_instance(wb, CHUNK, "q", "a", max_length=40)
    assert inst.input_ids[0] == 1 and inst.length == 40


def test_append_eos_ends_the_answer(tok):
    """EOS is the last id and one more answer token; the prompt is unchanged; scoring (default) has none."""
    q = "What is the capital of France?"
    plain = build_instance(tok, CHUNK, q, "Paris", max_length=256)
    eos = build_instance(tok, CHUNK, q, "Paris", max_length=256, append_eos=True)
    assert tok.eos_token_id is not None
    assert eos.input_ids[-1] == tok.eos_token_id and plain.input_ids[-1] != tok.eos_token_id
    assert eos.answer_len == plain.answer_len + 1 and eos.answer_start == plain.answer_start
    assert eos.input_ids[:-1] == plain.input_ids
    assert eos.answer_ids == plain.answer_ids + [tok.eos_token_id]
    assert tok.decode(eos.answer_ids, skip_special_tokens=True) == " Paris"
    # the collators score the EOS target like any answer token (SmolLM2 pads with the same id)
    assert tok.pad_token_id == tok.eos_token_id
    for batch in (collate_padded([eos, plain], tok.pad_token_id), collate_packed([eos, plain], tok.pad_token_id)):
        assert batch["answer_targets"].tolist() == eos.answer_ids + plain.answer_ids
        flat = batch["input_ids"].reshape(-1)
        assert flat[batch["answer_positions"] + 1].tolist() == batch["answer_targets"].tolist()


def test_append_eos_truncation_leaves_room(tok):
    q, a = "What is the capital of France?", "Paris"
    bare = build_instance(tok, None, q, a, max_length=512, append_eos=True)
    full = build_instance(tok, CHUNK, q, a, max_length=512, append_eos=True)
    for max_length in range(bare.length, full.length + 2):
        inst = build_instance(tok, CHUNK, q, a, max_length=max_length, append_eos=True)
        assert inst.length <= max_length and inst.input_ids[-1] == tok.eos_token_id
        assert inst.answer_ids == full.answer_ids
        if inst.chunk_truncated and inst.chunk_tokens:
            assert inst.length == max_length
    # fits without EOS, one token short with it: an error naming the example, not a silent cut
    no_eos = build_instance(tok, None, q, a, max_length=512)
    build_instance(tok, None, q, a, max_length=no_eos.length)
    with pytest.raises(RaditError, match=r"example e1: question and answer alone take \d+ tokens"):
        build_instance(tok, None, q, a, max_length=no_eos.length, append_eos=True, example_id="e1")


def test_append_eos_needs_an_eos_token(tok):
    class NoEos:  # the real tokenizer without an EOS token
        eos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return tok(text, add_special_tokens=add_special_tokens)

    build_instance(NoEos(), None, "q", "a", max_length=64)  # fine without append_eos
    with pytest.raises(RaditError, match=r"example x: append_eos needs a tokenizer with an EOS token.*--no-append-eos"):
        build_instance(NoEos(), None, "q", "a", max_length=64, append_eos=True, example_id="x")


def test_question_text_choices():
    ex = Example(id="1", input="Pick one", answers=["b"], choices=["a", "b"])
    assert question_text(ex) == "Pick one"
    assert question_text(ex, show_choices=True) == "Pick one\nA. a\nB. b"


def _instances(tok, n=7, seed=0):
    rng = random.Random(seed)
    return [build_instance(tok, CHUNK[:rng.randint(0, len(CHUNK))], f"Question number {i}?",
                           " ".join(["answer"] * rng.randint(1, 4)), max_length=64, rng=rng) for i in range(n)]


def _check_answer_index(batch, insts, flat_ids):
    pos, tgt, seg = batch["answer_positions"], batch["answer_targets"], batch["segment_ids"]
    assert len(pos) == len(tgt) == len(seg) == sum(i.answer_len for i in insts)
    assert torch.equal(flat_ids[pos + 1], tgt)  # position t-1 predicts token t
    assert bool((seg[1:] >= seg[:-1]).all())
    for i, inst in enumerate(insts):
        assert tgt[seg == i].tolist() == inst.answer_ids


def test_collate_padded(tok):
    insts = _instances(tok)
    batch = collate_padded(insts, pad_id=tok.pad_token_id)
    B, T = batch["input_ids"].shape
    assert B == len(insts) and T == max(i.length for i in insts)
    for b, inst in enumerate(insts):
        assert batch["input_ids"][b, :inst.length].tolist() == inst.input_ids
        assert batch["attention_mask"][b].sum() == inst.length
        assert (batch["input_ids"][b, inst.length:] == tok.pad_token_id).all()
    _check_answer_index(batch, insts, batch["input_ids"].reshape(-1))
    # every answer position lies inside its own instance's real tokens
    assert batch["attention_mask"].reshape(-1)[batch["answer_positions"]].all()


@pytest.mark.parametrize("max_tokens", [None, 64, 100])
def test_collate_packed(tok, max_tokens):
    insts = _instances(tok, n=9)
    batch = collate_packed(insts, pad_id=tok.pad_token_id, max_tokens=max_tokens)
    ids, pos, seq = batch["input_ids"], batch["position_ids"], batch["sequence_ids"]
    if max_tokens is None:
        assert ids.shape == (1, sum(i.length for i in insts))
    else:
        assert ids.shape[1] <= max_tokens
    for i, inst in enumerate(insts):
        where = seq == i
        assert where.sum() == inst.length
        assert ids[where].tolist() == inst.input_ids
        assert pos[where].tolist() == list(range(inst.length))
    assert (ids[seq == -1] == tok.pad_token_id).all()
    _check_answer_index(batch, insts, ids.reshape(-1))
    assert (seq.reshape(-1)[batch["answer_positions"]] == batch["segment_ids"]).all()


def test_collate_rejects_bad_instances():
    with pytest.raises(ValueError, match="answer must be the last"):
        collate_padded([Instance([5, 6, 7], answer_start=0, answer_len=3)], pad_id=0)
    with pytest.raises(ValueError, match="answer must be the last"):
        collate_padded([Instance([5, 6, 7], answer_start=1, answer_len=1)], pad_id=0)
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_rows([3, 10], max_tokens=8)


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 4, 2, 6], max_tokens=8)
    assert sorted(i for r in rows for i in r) == list(range(5))
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows)
    assert rows == [[4, 3], [0, 1], [2]]
    assert pack_rows([1, 2], None) == [[0, 1]]


def test_bucket_batches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    batches = bucket_batches(lengths, batch_size=8, seed=3, window=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert sum(len(b) < 8 for b in batches) == 1
    assert batches == bucket_batches(lengths, batch_size=8, seed=3, window=16)
    assert batches != bucket_batches(lengths, batch_size=8, seed=4, window=16)
    # bucketing cuts padding compared with random batches
    def waste(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    order = list(range(1003))
    random.Random(3).shuffle(order)
    assert waste(batches) < 0.2 * waste([order[j:j + 8] for j in range(0, 1003, 8)])
    full = bucket_batches(lengths, batch_size=8, seed=3, window=4, drop_last=True)
    assert all(len(b) == 8 for b in full) and len(full) == 1003 // 8
