"""The RA-DIT prompt template, its tokenisation for answer scoring, and the batch collators.

Template (docs/method.md, "Prompt template")::

    Background: {chunk}\\n\\n[{demo question/answer}\\n\\n ...]Q: {question}\\nA: {answer}

No chunk, no Background line. Training randomises ``Q:``/``Question:`` and ``A:``/``Answer:`` per instance
(pass a seeded ``random.Random``); evaluation uses ``Q:``/``A:``. Few-shot demonstrations use the same
markers and sit between the background and the question (the retrieved chunk is prepended to the whole
in-context input, as in RA-DIT/REPLUG).

>>> format_prompt("Paris is in France.", "Where is Paris?")
'Background: Paris is in France.\\n\\nQ: Where is Paris?\\nA:'
>>> format_prompt(None, "2+2?", shots=[("1+1?", "2")], markers=("Question:", "Answer:"))
'Question: 1+1?\\nAnswer: 2\\n\\nQuestion: 2+2?\\nAnswer:'

Tokenisation (:func:`build_instance`): the prompt pieces and the answer ``" {answer}"`` are tokenised
separately and their ids concatenated, so the answer boundary is exact; the tokenizer's own prefix (BOS)
is added when it uses one. With ``append_eos`` (RA-IT training) the answer ends with the EOS id, which is
then one of the scored answer tokens. Only the chunk is truncated (at the token level, keeping its beginning) to
fit ``max_length``; when not even one chunk token fits, the background is left out.

Collation: position ``t - 1`` predicts token ``t``, so an answer occupying tokens
``[answer_start, length)`` is scored from the hidden states at ``[answer_start - 1, length - 1)``.
Both collators return ``answer_positions`` (flat indices into the ``R x L`` token grid),
``answer_targets`` (the token each position must predict) and ``segment_ids`` (the index of the instance
in the input list, non-decreasing), ready for :func:`radit_fast.packing.pack_forward` and the fused op.
"""
from __future__ import annotations

import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from radit_fast.io import RaditError

Q_MARKERS = ("Q:", "Question:")
A_MARKERS = ("A:", "Answer:")
EVAL_MARKERS = ("Q:", "A:")
BACKGROUND = "Background:"


@dataclass(frozen=True)
class Instance:
    """One tokenised sequence: prompt ids followed by the ``answer_len`` answer ids."""

    input_ids: list[int]
    answer_start: int
    answer_len: int
    chunk_tokens: int = 0          # chunk tokens kept (0: no background)
    chunk_truncated: bool = False  # the chunk was cut (or dropped) to fit max_length

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start:]


def choose_markers(rng: random.Random | None) -> tuple[str, str]:
    """``("Q:", "A:")`` without an rng; else each marker drawn independently (paper's randomisation)."""
    if rng is None:
        return EVAL_MARKERS
    return rng.choice(Q_MARKERS), rng.choice(A_MARKERS)


def format_instruction(question: str, markers: tuple[str, str] = EVAL_MARKERS) -> str:
    """``Q: question\nA:``; a question rendered from a task template (:func:`render_template`) keeps its own
    layout, with the ``{Q}``/``{A}`` placeholders replaced by the markers."""
    if A_SLOT in question:
        return question.replace(Q_SLOT, markers[0]).replace(A_SLOT, markers[1])
    return f"{markers[0]} {question}\n{markers[1]}"


def format_body(question: str, *, shots: Sequence[tuple[str, str]] = (),
                markers: tuple[str, str] = EVAL_MARKERS) -> str:
    """Demonstrations and the instruction, without the background."""
    demos = [f"{format_instruction(q, markers)} {a}" for q, a in shots]
    return "\n\n".join([*demos, format_instruction(question, markers)])


def format_prompt(chunk: str | None, question: str, *, shots: Sequence[tuple[str, str]] = (),
                  markers: tuple[str, str] = EVAL_MARKERS) -> str:
    """The prompt as text (ends with the answer marker; the answer follows as ``" " + answer``)."""
    body = format_body(question, shots=shots, markers=markers)
    return f"{BACKGROUND} {chunk.strip()}\n\n{body}" if chunk and chunk.strip() else body


def question_text(example: Any, *, show_choices: bool = False, template: str | None = None) -> str:
    """The question of a task example; with ``show_choices`` its options are listed (``A. ...``) below.
    With a ``template`` (a name of :data:`TEMPLATES` or a template string) the example is rendered by
    :func:`render_template` instead."""
    if template is not None:
        return render_template(template, example)
    text = example.input
    if show_choices and example.choices:
        text += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(example.choices))
    return text


# ------------------------------------------------------------------------------------ task templates
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Q_SLOT, A_SLOT = "{Q}", "{A}"
#: Prompt templates by task type. Fields: ``{question}`` (the input), ``{subject}`` / ``{relation}`` (slot
#: filling inputs ``"subject [SEP] relation"``), ``{options}`` (lettered options, one per line: the LM then
#: answers with the letter), ``{Q}`` / ``{A}`` (the question and answer markers, ``Q:``/``A:`` at evaluation).
TEMPLATES = {
    "qa": "{Q} {question}\n{A}",
    "fact_checking": "{Q} Is the following claim true or false? {question}\n{A}",
    "slot_filling": "{Q} {subject} - {relation}?\n{A}",
    "multiple_choice": "{Q} {question}\n{options}\n{A}",
    "long_form": "{Q} {question}\n{A}",
    "dialogue": "{question}\n{A}",
    "entity_linking": "{Q} Which Wikipedia article does the entity between [START_ENT] and [END_ENT] refer to? "
                      "{question}\n{A}",
}
#: The template of each task of the paper (KILT names as in its file names, and MMLU).
TASK_TEMPLATES = {
    "nq": "qa", "triviaqa": "qa", "hotpotqa": "qa", "fever": "fact_checking", "zsre": "slot_filling",
    "structured_zeroshot": "slot_filling", "trex": "slot_filling", "eli5": "long_form", "wow": "dialogue",
    "aida": "entity_linking", "mmlu": "multiple_choice",
}
_FIELDS = ("{question}", "{subject}", "{relation}", "{options}")


def resolve_template(spec: str | None, task: str | None = None) -> str | None:
    """The template string for ``spec``: ``None``/``"auto"`` (by ``task``, see :data:`TASK_TEMPLATES`; None for
    an unknown task: the plain ``Q:``/``A:`` layout), a template or task name, or a template string (it must
    contain ``{A}`` and one of the fields).

    >>> resolve_template("fever")
    '{Q} Is the following claim true or false? {question}\\n{A}'
    >>> resolve_template("auto", "mmlu") == TEMPLATES["multiple_choice"], resolve_template("auto", "mine")
    (True, None)
    """
    if spec is None or spec == "auto":
        return TEMPLATES[TASK_TEMPLATES[task]] if task in TASK_TEMPLATES else None
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec in TASK_TEMPLATES:
        return TEMPLATES[TASK_TEMPLATES[spec]]
    if A_SLOT in spec and any(f in spec for f in _FIELDS):
        return spec
    raise RaditError(f"template {spec!r}: not a template name ({', '.join(TEMPLATES)}), a task name "
                     f"({', '.join(TASK_TEMPLATES)}) or a template string with {{A}} and {{question}}")


def lettered(template: str | None) -> bool:
    """Whether a template lists the options as letters (the answer is then the option's letter)."""
    return template is not None and "{options}" in template


def render_template(template: str, example: Any) -> str:
    """Fill a template's fields from ``example`` (``{Q}``/``{A}`` stay for :func:`format_instruction`).

    >>> from radit_fast.data.tasks import Example
    >>> ex = Example("1", "Kate Sullivan [SEP] country of citizenship", ["United States"])
    >>> format_instruction(render_template(resolve_template("slot_filling"), ex))
    'Q: Kate Sullivan - country of citizenship?\\nA:'
    >>> mc = Example("2", "2 + 2 =", ["4"], choices=["3", "4"])
    >>> format_instruction(render_template(resolve_template("mmlu"), mc), ("Question:", "Answer:"))
    'Question: 2 + 2 =\\nA. 3\\nB. 4\\nAnswer:'
    """
    template = resolve_template(template)
    subject, sep, relation = example.input.partition("[SEP]")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(example.choices or []))
    values = {"{subject}": subject.strip(), "{relation}": relation.strip() if sep else "",
              "{options}": options, "{question}": example.input.strip()}
    out, i = [], 0
    while i < len(template):  # one left-to-right pass: text inserted from a field is never re-read
        for key, value in values.items():
            if template.startswith(key, i):
                out.append(value)
                i += len(key)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


_PREFIX_CACHE: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text when it adds special tokens (BOS), else ``[]``."""
    try:
        return _PREFIX_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "radit probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    prefix: list[int] = []
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            prefix = list(full[:i])
            break
    try:
        _PREFIX_CACHE[tokenizer] = prefix
    except TypeError:
        pass
    return prefix


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer: Any, chunk: str | None, question: str, *, max_length: int,
                 rng: random.Random | None = None, shots: Sequence[tuple[str, str]] = (), reserve: int = 0,
                 example_id: str | None = None) -> Instance:
    """Tokenise the prompt only (``answer_len == 0``), keeping ``reserve`` tokens free for the answer
    (the generation budget at evaluation). Same truncation and errors as :func:`build_instance`."""
    name = example_id if example_id is not None else repr(question[:60])
    bos = special_prefix(tokenizer)
    body = format_body(question, shots=shots, markers=choose_markers(rng))
    base = bos + _encode(tokenizer, body)
    if len(base) + reserve > max_length:
        raise RaditError(f"example {name}: question and answer alone take {len(base) + reserve} tokens, "
                         f"more than --max-length {max_length} (only the background is truncated)")
    prompt, kept, truncated = base, 0, False
    if chunk and chunk.strip():
        header = _encode(tokenizer, BACKGROUND)
        chunk_ids = _encode(tokenizer, " " + chunk.strip())
        rest = _encode(tokenizer, "\n\n" + body)
        budget = max_length - len(bos) - len(header) - len(rest) - reserve
        kept = max(0, min(budget, len(chunk_ids)))
        truncated = kept < len(chunk_ids)
        if kept > 0:
            prompt = bos + header + chunk_ids[:kept] + rest
    return Instance(input_ids=prompt, answer_start=len(prompt), answer_len=0, chunk_tokens=kept,
                    chunk_truncated=truncated)


def build_instance(tokenizer: Any, chunk: str | None, question: str, answer: str, *, max_length: int,
                   rng: random.Random | None = None, shots: Sequence[tuple[str, str]] = (),
                   example_id: str | None = None, append_eos: bool = False) -> Instance:
    """Tokenise ``Background: chunk \\n\\n [shots] Q: question \\n A:`` + ``" answer"`` into one Instance.

    ``rng``: a seeded ``random.Random`` draws the Q/A markers (training); None uses ``Q:``/``A:``.
    ``append_eos``: end the answer with ``tokenizer.eos_token_id`` (RA-IT training, so the tuned LM learns
    to stop; it counts in ``answer_len`` and in the room kept free for the answer). Off for scoring: LSR
    targets and evaluation score the answer's own tokens. The answer ids are the last ``answer_len`` ids.
    Raises RaditError naming the example when the question, demonstrations and answer alone do not fit
    ``max_length``, the answer is empty, or ``append_eos`` is set and the tokenizer has no EOS token.
    """
    name = example_id if example_id is not None else repr(question[:60])
    if not answer or not answer.strip():
        raise RaditError(f"example {name}: empty answer")
    answer_ids = _encode(tokenizer, " " + answer.strip())
    if append_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(eos, int):
            raise RaditError(f"example {name}: append_eos needs a tokenizer with an EOS token, and "
                             f"{type(tokenizer).__name__} has none (eos_token_id={eos!r}); turn it off "
                             "(--no-append-eos) or set tokenizer.eos_token")
        answer_ids.append(eos)
    prompt = build_prompt(tokenizer, chunk, question, max_length=max_length, rng=rng, shots=shots,
                          reserve=len(answer_ids), example_id=example_id)
    return Instance(input_ids=prompt.input_ids + answer_ids, answer_start=prompt.length,
                    answer_len=len(answer_ids), chunk_tokens=prompt.chunk_tokens,
                    chunk_truncated=prompt.chunk_truncated)


# ------------------------------------------------------------------------------------------- collation


def _answer_index(instances: Sequence[Instance], row_of: list[int], offset_of: list[int], row_len: int):
    positions, targets, segments = [], [], []
    for i, inst in enumerate(instances):
        if inst.answer_start < 1 or inst.answer_len < 1 or inst.answer_start + inst.answer_len != inst.length:
            raise ValueError(f"instance {i}: answer must be the last answer_len >= 1 tokens after >= 1 prompt "
                             f"token (answer_start={inst.answer_start}, answer_len={inst.answer_len}, "
                             f"length={inst.length})")
        base = row_of[i] * row_len + offset_of[i]
        for t in range(inst.answer_start, inst.length):
            positions.append(base + t - 1)
            targets.append(inst.input_ids[t])
            segments.append(i)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(positions), as_long(targets), as_long(segments)


def collate_padded(instances: Sequence[Instance], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``B`` instances.

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]`` (1 real, 0 pad), ``answer_positions [N]``
    (flat ``b * T + t - 1``), ``answer_targets [N]`` (``input_ids[b, t]``), ``segment_ids [N]`` (``b``).
    """
    if not instances:
        raise ValueError("collate_padded needs at least one instance")
    width = max(inst.length for inst in instances)
    input_ids = torch.full((len(instances), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(instances), width), dtype=torch.long)
    for b, inst in enumerate(instances):
        input_ids[b, :inst.length] = torch.tensor(inst.input_ids, dtype=torch.long)
        attention_mask[b, :inst.length] = 1
    positions, targets, segments = _answer_index(instances, list(range(len(instances))),
                                                 [0] * len(instances), width)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_positions": positions,
            "answer_targets": targets, "segment_ids": segments}


def pack_rows(lengths: Sequence[int], max_tokens: int | None = None) -> list[list[int]]:
    """Group instance indices into rows of at most ``max_tokens`` tokens (first-fit decreasing,
    deterministic); None puts everything in one row. Each row lists its indices in placement order."""
    if max_tokens is None:
        return [list(range(len(lengths)))] if len(lengths) else []
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if lengths[i] > max_tokens:
            raise ValueError(f"instance {i} has {lengths[i]} tokens, more than max_tokens={max_tokens}")
        for r in range(len(rows)):
            if fill[r] + lengths[i] <= max_tokens:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def collate_packed(instances: Sequence[Instance], pad_id: int, *,
                   max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Pack instances into ``R`` rows (see :func:`pack_rows`); attention stays inside each instance.

    Returns ``input_ids [R, L]``, ``position_ids [R, L]`` (restarting at 0 per instance; padding at a
    row's end counts from 0 as well), ``sequence_ids [R, L]`` (instance index, -1 for padding) and
    ``answer_positions``, ``answer_targets``, ``segment_ids`` as in :func:`collate_padded`
    (``segment_ids`` index the input list, so results come back in input order).
    """
    if not instances:
        raise ValueError("collate_packed needs at least one instance")
    rows = pack_rows([inst.length for inst in instances], max_tokens)
    width = max(sum(instances[i].length for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    row_of, offset_of = [0] * len(instances), [0] * len(instances)
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            n = instances[i].length
            input_ids[r, off:off + n] = torch.tensor(instances[i].input_ids, dtype=torch.long)
            position_ids[r, off:off + n] = torch.arange(n)
            sequence_ids[r, off:off + n] = i
            row_of[i], offset_of[i] = r, off
            off += n
        position_ids[r, off:] = torch.arange(width - off)
    positions, targets, segments = _answer_index(instances, row_of, offset_of, width)
    return {"input_ids": input_ids, "position_ids": position_ids, "sequence_ids": sequence_ids,
            "answer_positions": positions, "answer_targets": targets, "segment_ids": segments}


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, *, window: int = 64,
                   drop_last: bool = False) -> list[list[int]]:
    """Length-bucketed batches of indices: shuffle (seeded), sort each pool of ``window * batch_size``
    by length, cut it into batches, shuffle the batches. Every index appears exactly once (unless
    ``drop_last`` drops the short batches); only the last pool can leave a short batch."""
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = window * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])  # stable: shuffled ties
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches
