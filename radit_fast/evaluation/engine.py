"""Batched LM passes for evaluation: shared-prefix scoring of continuations and greedy decoding with a KV cache.

Every augmented prompt ``c_i o x`` is run through the decoder body once (the *prefix pass*); its KV cache
is then reused

* to score any number of continuations (the answer, or every option of a multiple-choice question):
  the cache rows are gathered per continuation, only the continuation tokens are run, and the hidden
  states that predict them (the prompt's last position, then the continuation's own positions but the
  last) go through the fused LM head op ``answer_logprobs_per_sequence``, so the ``N x V`` logits are
  never formed;
* to decode greedily, one token per step for all rows, from the token-level mixture of the k augmented
  prompts of each example (``mixture_logprobs``), or from each prompt on its own.

Padding: prompts are right-padded; a continuation's attention mask is ``[prompt mask | ones]`` (holes in
the middle are fine) and its ``position_ids`` continue from the prompt's own length, so each row computes
exactly what an unpadded run of ``prompt + continuation`` computes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from radit_fast.models import attention_implementation, decoder_body, lm_head_weight
from radit_fast.ops.answer_logprobs import answer_logprobs_per_sequence
from radit_fast.ops.mixture import mixture_logprobs

log = logging.getLogger(__name__)


@dataclass
class _Prefix:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer keys/values [R, H, L, Dh]
    last_hidden: torch.Tensor                    # [R, d] hidden state at each prompt's last token
    lengths: torch.Tensor                        # [R]
    mask: torch.Tensor                           # [R, L]


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # legacy tuple caches


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], config):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv, config=config)


class LMEngine:
    """Evaluation passes over one causal LM (any Hugging Face ``*ForCausalLM`` with a plain linear head).

    Args:
        model: the LM (eval mode; its dtype and device are used as they are).
        pad_id: token id used for padding (never attended to).
        batch_size: augmented prompts per prefix pass.
        max_rows: continuation rows per continuation pass (bounds the gathered KV cache copies).
        impl: backend of the fused LM head op (``"auto"|"cpu"|"cuda"|"triton"|"torch"``).
    """

    def __init__(self, model: nn.Module, *, pad_id: int, batch_size: int = 16, max_rows: int = 64,
                 impl: str = "auto") -> None:
        if batch_size < 1 or max_rows < 1:
            raise ValueError("batch_size and max_rows must be >= 1")
        self.model = model
        self.body = decoder_body(model)
        self.weight, self.bias = lm_head_weight(model)
        self.config = self.body.config
        self.device = self.weight.device
        self.pad_id = int(pad_id)
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.impl = impl

    # ------------------------------------------------------------------------------------ passes
    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        width = int(lengths.max())
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids.to(self.device), mask.to(self.device), lengths.to(self.device)

    @torch.inference_mode()
    def _prefix_pass(self, prompts: Sequence[Sequence[int]]) -> _Prefix:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be scored (it has no position to predict from)")
        ids, mask, lengths = self._pad(prompts)
        pos = torch.arange(ids.shape[1], device=self.device)[None, :].expand_as(ids)
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, return_dict=True)
        hidden = out.last_hidden_state
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return _Prefix(_cache_layers(out.past_key_values), last, lengths, mask)

    def _continue(self, pre: _Prefix, rows: torch.Tensor, tokens: torch.Tensor, tok_mask: torch.Tensor,
                  offset: int = 0) -> tuple[torch.Tensor, object]:
        """Run ``tokens [R, Lc]`` after the cached prompts ``rows [R]``; returns hidden [R, Lc, d] and cache."""
        kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in pre.kv]
        cache = _make_cache(kv, self.config)
        mask = torch.cat([pre.mask.index_select(0, rows), tok_mask], dim=1)
        pos = pre.lengths.index_select(0, rows)[:, None] + offset + torch.arange(tokens.shape[1],
                                                                                device=self.device)[None, :]
        out = self.body(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, return_dict=True)
        return out.last_hidden_state, out.past_key_values

    # ---------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], *,
              progress=None) -> list[list[float]]:
        """``log p(cont | prompt)`` (sum over the continuation's tokens) for every continuation of every prompt.

        ``continuations[i]`` lists the candidate token sequences after ``prompts[i]`` (each non-empty).
        Returns the same nesting of floats. ``progress`` (a tqdm bar) advances by one per prompt.

        With eager/sdpa attention each prompt and all its continuations form one row with a tree mask
        (every continuation sees the prompt and itself, positions continue from the prompt): one forward
        pass per prompt. With flash-attention (no custom masks) the prompt's KV cache is reused instead.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuation lists")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be scored (it has no position to predict from)")
        if any(len(c) == 0 for cs in continuations for c in cs):
            raise ValueError("an empty continuation cannot be scored")
        tree = not attention_implementation(self.model).startswith("flash")
        out: list[list[float]] = [[0.0] * len(c) for c in continuations]
        size = lambda i: len(prompts[i]) + sum(len(c) for c in continuations[i])  # noqa: E731
        order = sorted(range(len(prompts)), key=lambda i: -size(i))
        for b0 in range(0, len(order), self.batch_size):
            batch = order[b0:b0 + self.batch_size]
            scorer = self._score_tree if tree else self._score_cached
            for i, vals in zip(batch, scorer([prompts[i] for i in batch], [continuations[i] for i in batch])):
                out[i] = vals
            if progress is not None:
                progress.update(len(batch))
        return out

    def _score_tree(self, prompts, conts) -> list[list[float]]:
        rows = [list(p) + [t for c in cs for t in c] for p, cs in zip(prompts, conts)]
        width = max(len(r) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        group = torch.full((n, width), -1, dtype=torch.long)   # 0 prompt, j + 1 continuation j, -1 pad
        pos = torch.zeros((n, width), dtype=torch.long)
        pred, target, seg = [], [], []
        n_seg = 0
        for r, (p, cs) in enumerate(zip(prompts, conts)):
            ids[r, : len(rows[r])] = torch.as_tensor(rows[r], dtype=torch.long)
            group[r, : len(p)] = 0
            pos[r, : len(p)] = torch.arange(len(p))
            at = len(p)
            for j, c in enumerate(cs):
                group[r, at:at + len(c)] = j + 1
                pos[r, at:at + len(c)] = len(p) + torch.arange(len(c))
                for t, tok in enumerate(c):  # token t is predicted by the prompt's end (t = 0) or by token t-1
                    pred.append(r * width + (len(p) - 1 if t == 0 else at + t - 1))
                    target.append(tok)
                    seg.append(n_seg)
                at += len(c)
                n_seg += 1
        q, k = group[:, :, None], group[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        allowed = causal & (((k == 0) & (q >= 0)) | ((k == q) & (q > 0)))
        allowed |= torch.eye(width, dtype=torch.bool) & (q < 0)  # padding sees itself: no empty softmax row
        dtype = self.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        out = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                        position_ids=pos.to(self.device), use_cache=False, return_dict=True)
        hidden = out.last_hidden_state.reshape(n * width, -1)
        dev = self.device
        h = hidden.index_select(0, torch.tensor(pred, device=dev))
        logp = answer_logprobs_per_sequence(h, self.weight, torch.tensor(target, device=dev),
                                            segment_ids=torch.tensor(seg, device=dev), num_segments=n_seg,
                                            bias=self.bias, impl=self.impl).float().tolist()
        res, s = [], 0
        for cs in conts:
            res.append(logp[s:s + len(cs)])
            s += len(cs)
        return res

    def _score_cached(self, prompts, conts) -> list[list[float]]:
        pre = self._prefix_pass(prompts)
        res = [[0.0] * len(cs) for cs in conts]
        pairs = [(j, c) for j, cs in enumerate(conts) for c in range(len(cs))]
        for r0 in range(0, len(pairs), self.max_rows):
            chunk = pairs[r0:r0 + self.max_rows]
            seqs = [conts[j][c] for j, c in chunk]
            rows = torch.tensor([j for j, _ in chunk], dtype=torch.long, device=self.device)
            ids, mask, _ = self._pad(seqs)
            hidden, _ = self._continue(pre, rows, ids, mask)
            # Row r's token t is predicted by the prompt's last state (t = 0) or by its own state t-1.
            pred = torch.cat([pre.last_hidden.index_select(0, rows)[:, None], hidden[:, :-1]], dim=1)
            sel = mask.bool()
            seg = torch.arange(len(chunk), device=self.device)[:, None].expand_as(ids)[sel]
            logp = answer_logprobs_per_sequence(pred[sel], self.weight, ids[sel], segment_ids=seg,
                                                num_segments=len(chunk), bias=self.bias, impl=self.impl)
            for (j, c), v in zip(chunk, logp.float().tolist()):
                res[j][c] = v
        return res

    # -------------------------------------------------------------------------------- decoding
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[Sequence[int]]], log_weights: Sequence[Sequence[float]],
                 *, max_new_tokens: int, stop_ids: set[int] | frozenset[int], reweight: bool = False,
                 eos_ids: set[int] | frozenset[int] = frozenset(), blank_ids: set[int] | frozenset[int] = frozenset(),
                 progress=None) -> list[list[int]]:
        """Greedy decoding from the token-level mixture of each example's augmented prompts.

        ``prompts[b]`` holds the k_b >= 1 token sequences of example b (its chunks prepended to the query),
        ``log_weights[b]`` their k_b retriever log-weights (any scale: they are renormalised). At step t
        every prompt of example b is fed the same token
        ``argmax_y log sum_i softmax(w_b)_i p_LM(y | c_i o x, y_<t)``. With ``reweight`` the weights
        become the posterior ``w_i + log p_LM(y_<t | c_i o x)`` (the chunks that explain the answer so far
        gain weight). Decoding of an example stops at a token of ``eos_ids``, at a token of ``stop_ids``
        (e.g. newlines) once it has produced a token outside ``blank_ids`` (so leading blank lines are
        skipped, kept in the output), neither stop token being returned, or after
        ``max_new_tokens``. Returns the generated token ids of each example. ``progress`` (a tqdm bar)
        advances by one per prompt.
        """
        if len(prompts) != len(log_weights):
            raise ValueError(f"{len(prompts)} examples but {len(log_weights)} weight lists")
        results: list[list[int]] = [[] for _ in prompts]
        # Examples are batched whole (their k prompts together), about batch_size prompts per batch.
        order = sorted(range(len(prompts)), key=lambda b: -max(len(p) for p in prompts[b]))
        batches, cur, size = [], [], 0
        for b in order:
            k_b = len(prompts[b])
            if k_b == 0:
                raise ValueError(f"example {b} has no prompt")
            if cur and size + k_b > self.batch_size:
                batches.append(cur)
                cur, size = [], 0
            cur.append(b)
            size += k_b
        if cur:
            batches.append(cur)
        for batch in batches:
            for b, toks in zip(batch, self._generate_batch([prompts[b] for b in batch],
                                                           [log_weights[b] for b in batch],
                                                           max_new_tokens, stop_ids, reweight, eos_ids,
                                                           blank_ids)):
                results[b] = toks
            if progress is not None:
                progress.update(sum(len(prompts[b]) for b in batch))
        return results

    def _generate_batch(self, prompts, log_weights, max_new_tokens, stop_ids, reweight, eos_ids=frozenset(),
                        blank_ids=frozenset()) -> list[list[int]]:
        n_ex = len(prompts)
        k_max = max(len(p) for p in prompts)
        flat = [p for ps in prompts for p in ps]
        owner = torch.tensor([b for b, ps in enumerate(prompts) for _ in ps], device=self.device)
        slot = torch.tensor([i for ps in prompts for i in range(len(ps))], device=self.device)
        # Missing chunks (k_b < k_max) get weight -inf; they never mix in.
        w = torch.full((n_ex, k_max), float("-inf"), device=self.device)
        for b, lw in enumerate(log_weights):
            if len(lw) != len(prompts[b]):
                raise ValueError(f"example {b}: {len(prompts[b])} prompts but {len(lw)} weights")
            w[b, : len(lw)] = torch.as_tensor(list(lw), dtype=torch.float32)
        pre = self._prefix_pass(flat)
        rows = torch.arange(len(flat), device=self.device)
        hidden = pre.last_hidden
        out: list[list[int]] = [[] for _ in range(n_ex)]
        done = torch.zeros(n_ex, dtype=torch.bool, device=self.device)
        as_t = lambda ids: torch.tensor(sorted(ids), dtype=torch.long, device=self.device)  # noqa: E731
        stop, eos, blank = as_t(stop_ids), as_t(eos_ids), as_t(blank_ids)
        started = torch.zeros(n_ex, dtype=torch.bool, device=self.device)
        cache = None
        full = len(flat) == n_ex * k_max  # every example has k_max prompts: the grid is a view
        for t in range(max_new_tokens):
            logits = nn.functional.linear(hidden, self.weight, self.bias).float()   # [R, V] (decoding only)
            if full:
                grid = logits.view(n_ex, k_max, -1)
            else:
                grid = logits.new_zeros(n_ex, k_max, logits.shape[-1])
                grid[owner, slot] = logits
            nxt = mixture_logprobs(grid, w.log_softmax(-1), impl=self.impl).argmax(-1)  # [n_ex]
            is_stop = torch.isin(nxt, eos) | (torch.isin(nxt, stop) & started) | done
            started |= ~torch.isin(nxt, blank)
            for b, (tok_b, stop_b) in enumerate(zip(nxt.tolist(), is_stop.tolist())):
                if not stop_b:
                    out[b].append(tok_b)
            done = is_stop
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            if reweight:  # posterior weights: add each chunk's log-prob of the chosen token
                step = logits[rows, nxt[owner]] - logits.logsumexp(-1)
                w = w + torch.zeros_like(w).index_put_((owner, slot), step)
            tok = nxt[owner][:, None]
            ones = torch.ones(len(flat), t + 1, dtype=torch.long, device=self.device)
            if cache is None:  # every row continues its own prompt: the prefix cache is used as is
                cache = _make_cache(pre.kv, self.config)
            mask = torch.cat([pre.mask, ones], dim=1)
            pos = pre.lengths[:, None] + t
            o = self.body(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, return_dict=True)
            h, cache = o.last_hidden_state, o.past_key_values
            hidden = h[:, -1]
        return out
