"""Batching of the target optimization: the prompt rows of a round's requests, micro-batches under
a token budget, length groups, the prefix key/value cache and the replay of the upper blocks
(docs/algorithms.md, "Target hidden states", "Fast path").

Each request ``i`` contributes one row per context template ``c(p_i)`` (target ``o*_i``), with
forgetting one more per template (target the old answer ``o_i``), and one KL row (the KL prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from blueedit.data.records import EditRequest
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import _StopForward, traced
from blueedit.models.tokens import PromptBatch, encode_fact_prompt, pad_batch, tokenize_target


@dataclass
class TargetRow:
    """One prompt row: token ids, the fact-token index, the target ids, its request."""

    ids: list[int]
    fact: int
    target: list[int]  # full target ids (rewriting rows); empty for the KL row
    request: int
    is_kl: bool
    is_old: bool = False  # an unlikelihood row: the target is the old answer o


_STOP_TEXT = {"newline": "\n", "period": "."}


def stop_ids(tokenizer, stop_after: str) -> list[int]:
    """The token ids placed after ``o*`` in the optimized target (``editing.target.stop_after``):
    ``[]`` for ``none``, ``[EOS]`` for ``eos``, the tokens of ``"\n"`` or ``"."`` otherwise."""
    if stop_after == "none":
        return []
    if stop_after == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("editing.target.stop_after 'eos': the tokenizer has no EOS token")
        return [int(tokenizer.eos_token_id)]
    ids = tokenizer(_STOP_TEXT[stop_after], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [i for i in ids if bos is None or i != bos]


def target_rows(tokenizer, requests: list[EditRequest], templates: list[str], kl_prompt: str,
                forget: bool = False, stop_after: str = "none", anchor: bool = False) -> list[TargetRow]:
    """Every request's rows, request by request: its rewriting prompts (target ``o*`` followed by
    :func:`stop_ids`), (``forget``) the same prompts with the old answer, its KL prompt;
    ``anchor``: a fact token at position 0 is moved to position 1
    (:func:`~blueedit.models.tokens.encode_fact_prompt`)."""
    rows = []
    stop = stop_ids(tokenizer, stop_after)
    for i, r in enumerate(requests):
        target = tokenize_target(tokenizer, r.target_new) + stop
        for c in templates:
            ids, fact = encode_fact_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject, anchor)
            rows.append(TargetRow(ids, fact, target, i, False))
        if forget:
            if not r.target_true:
                raise ValueError(f"edit record {i} (case_id={r.case_id!r}) has no 'target_true', which "
                                 "editing.target.forget_weight > 0 needs")
            old = tokenize_target(tokenizer, r.target_true)
            for c in templates:
                ids, fact = encode_fact_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject, anchor)
                rows.append(TargetRow(ids, fact, old, i, False, True))
        ids, fact = encode_fact_prompt(tokenizer, kl_prompt, r.subject, anchor)
        rows.append(TargetRow(ids, fact, [], i, True))
    return rows


def cache_argument(model) -> str:
    """The name of the key/value cache argument of ``model.forward``: ``cache`` in transformers 5
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixCache:
    """Key/value states of every row's tokens *before* its fact token, computed once per round.

    δ is injected at the fact token, so nothing before it depends on δ: each optimization step
    only runs the suffix (fact token, rest of the prompt, target tokens) on top of this cache.
    Prefixes are left-padded to a common length ``P``; layers above ``loss_layer`` are not run.
    """

    def __init__(self, model, adapter: ModelAdapter, prefixes: list[list[int]], pad: int, loss_layer: int):
        from transformers import DynamicCache

        device = next(model.parameters()).device
        self.cache_arg = cache_argument(model)
        self.P = max(len(p) for p in prefixes)
        self.lengths = torch.tensor([len(p) for p in prefixes], device=device)
        if self.P == 0:
            self.mask = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
            self.layers = None
            return
        batch = pad_batch(prefixes, [-1] * len(prefixes), pad_id=pad, padding_side="left").to(device)
        self.mask = batch.attention_mask
        cache = DynamicCache()
        with torch.no_grad(), traced(adapter, stop_after=loss_layer):
            try:
                model(**batch.model_inputs(), **{cache_argument(model): cache}, use_cache=True)
            except _StopForward:
                pass
        self.layers = [(layer.keys, layer.values) for layer in cache.layers[: loss_layer + 1]]

    def inputs(self, rows: torch.Tensor, suffix: PromptBatch) -> dict:
        """Model inputs for the suffixes of ``rows`` (right-padded ``suffix`` batch)."""
        from transformers import DynamicCache

        mask = torch.cat([self.mask[rows], suffix.attention_mask], dim=1)
        pos = (self.lengths[rows].unsqueeze(1) + suffix.position_ids)
        inputs = {"input_ids": suffix.input_ids, "attention_mask": mask, "position_ids": pos}
        if self.layers is not None:
            inputs[self.cache_arg] = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.layers])
            inputs["use_cache"] = True
        return inputs


_CACHE = object()  # where a captured call had the key/value cache (a fresh one is passed each step)


class BlockReplay:
    """Run only blocks ``first..last`` of later steps, from inputs captured on the first step.

    Nothing below the edit layer depends on δ, so the input of block ``first`` and the arguments
    every block receives (masks, position embeddings, ...) are recorded once (forward pre-hooks)
    and replayed for the rows still being optimized, with a fresh prefix cache each step.
    """

    def __init__(self, adapter: ModelAdapter, first: int, last: int):
        self.adapter, self.first, self.last = adapter, first, last
        self.calls: dict[int, tuple[tuple, dict]] = {}

    @contextmanager
    def capturing(self):
        """Record the arguments of blocks ``first..last`` during one forward pass."""
        def hook(b):
            def record(module, args, kwargs):
                self.calls[b] = (tuple(args), dict(kwargs))
            return record

        handles = [self.adapter.block(b).register_forward_pre_hook(hook(b), with_kwargs=True)
                   for b in range(self.first, self.last + 1)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._slim()

    def _slim(self) -> None:
        """Keep only what :meth:`run` reads: block ``first``'s input (detached) and every block's
        other arguments. The later blocks' hidden inputs (which depend on δ) and the key/value
        cache objects (a fresh one is passed each step) would otherwise stay alive for the whole
        optimization, one copy per length group."""
        from transformers import Cache

        def strip(x):
            if isinstance(x, Cache):
                return _CACHE
            if isinstance(x, (tuple, list)):
                return type(x)(strip(v) for v in x)
            return x

        for b, (args, kw) in list(self.calls.items()):
            if b == self.first:
                h = (args[0] if args else kw["hidden_states"]).detach()
            else:
                h = None
            if args:
                args = (h,) + tuple(strip(a) for a in args[1:])
            kw = {k: (h if k == "hidden_states" else strip(v)) for k, v in kw.items()}
            self.calls[b] = (args, kw)

    @staticmethod
    def _select(x, rows: torch.Tensor, n: int, cache):
        from transformers import Cache

        if x is _CACHE or isinstance(x, Cache):
            return cache
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == n:
            return x[rows].detach()  # masks, position embeddings: independent of δ
        if isinstance(x, (tuple, list)):
            return type(x)(BlockReplay._select(v, rows, n, cache) for v in x)
        return x

    def run(self, rows: torch.Tensor, n: int, cache) -> None:
        """Blocks ``first..last`` on ``rows`` (of the ``n`` captured); hooks see every block."""
        args0, kw0 = self.calls[self.first]
        h = (args0[0] if args0 else kw0["hidden_states"]).detach()[rows]  # below the edit layer: no δ
        for b in range(self.first, self.last + 1):
            args, kw = self.calls[b]
            args = tuple(self._select(a, rows, n, cache) for a in args[1:])
            kw = {k: self._select(v, rows, n, cache) for k, v in kw.items() if k != "hidden_states"}
            out = self.adapter.block(b)(h, *args, **kw)
            h = out[0] if isinstance(out, tuple) else out


class RowGroup:
    """Rows of similar suffix length, padded once to a common layout (fast path)."""

    def __init__(self, idx: list[int], rows: list[TargetRow], pad: int, device, replay: BlockReplay | None):
        self.rows = torch.tensor(sorted(idx), dtype=torch.long, device=device)
        self.size = len(idx)
        self.local = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        self.local[self.rows] = torch.arange(self.size, device=device)
        self.replay = replay
        members = [rows[k] for k in self.rows.tolist()]
        self.suffixes = pad_batch([r.ids[r.fact :] for r in members], [0] * len(members),
                                  [r.target[:-1] for r in members], pad_id=pad, padding_side="right").to(device)


def length_groups(lengths: list[int], min_saving: float = 0.15) -> list[list[int]]:
    """Split row indices into at most two groups by length when that saves at least
    ``min_saving`` of the padded positions (``max length × rows`` per group)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = [lengths[i] for i in order]
    n = len(sl)
    whole = sl[-1] * n
    best_k, best = n, whole
    for k in range(1, n):
        cost = sl[k - 1] * k + sl[-1] * (n - k)
        if cost < best:
            best_k, best = k, cost
    if whole == 0 or (whole - best) / whole < min_saving:
        return [list(range(n))]
    return [order[:best_k], order[best_k:]]


def request_chunks(costs: list[tuple[int, int]], max_batch_tokens: int | None) -> list[list[int]]:
    """Split requests, in order, into micro-batches under a token budget.

    ``costs[i] = (rows, length)``: request ``i`` contributes ``rows`` prompts whose longest is
    ``length`` tokens. A micro-batch of requests costs ``Σ rows × max length`` padded positions;
    consecutive requests are added while that stays ``≤ max_batch_tokens`` (a request above the
    budget on its own gets a micro-batch of its own). ``None``: one batch with every request.
    """
    if max_batch_tokens is None:
        return [list(range(len(costs)))] if costs else []
    chunks: list[list[int]] = []
    cur: list[int] = []
    n_rows = longest = 0
    for i, (rows, length) in enumerate(costs):
        n2, l2 = n_rows + rows, max(longest, length)
        if cur and n2 * l2 > max_batch_tokens:
            chunks.append(cur)
            cur, n2, l2 = [], rows, length
        cur.append(i)
        n_rows, longest = n2, l2
    if cur:
        chunks.append(cur)
    return chunks


class Chunk:
    """One micro-batch of requests: its rows, their prefix cache and their length groups."""

    def __init__(self, req: list[int], rows: list[TargetRow], model, adapter, pad: int, device, layer: int,
                 loss_layer: int, fast: bool):
        wanted = set(req)
        self.req = torch.tensor(req, dtype=torch.long, device=device)
        idx = [k for k, r in enumerate(rows) if r.request in wanted]
        self.rows = torch.tensor(idx, dtype=torch.long, device=device)
        self.local = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        self.local[self.rows] = torch.arange(len(idx), device=device)
        self.prefix = None
        if fast:  # suffixes from the fact token on (fact token = suffix position 0), in length groups
            self.prefix = PrefixCache(model, adapter, [rows[k].ids[: rows[k].fact] for k in idx], pad, loss_layer)
            lengths = [len(rows[k].ids) - rows[k].fact + max(len(rows[k].target) - 1, 0) for k in idx]
            self.groups = [RowGroup([idx[j] for j in g], rows, pad, device, BlockReplay(adapter, layer, loss_layer))
                           for g in length_groups(lengths)]
        else:
            self.groups = [RowGroup(idx, rows, pad, device, None)]


@dataclass
class RowTensors:
    """The rows as tensors (``R`` rows, ``J`` the longest target): ``request`` (``[R]``),
    ``is_kl`` / ``is_old`` (``[R]`` bool), ``bare`` (``[B]``: each request's bare-prompt row, where
    ``h_init`` is read), ``target_ids`` / ``target_mask`` (``[R, J]``, 0 past a row's target)."""

    request: torch.Tensor
    is_kl: torch.Tensor
    is_old: torch.Tensor
    bare: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor


def row_tensors(rows: list[TargetRow], n_req: int, device) -> RowTensors:
    bare = torch.tensor([next(k for k, r in enumerate(rows) if r.request == i and not r.is_kl and not r.is_old)
                         for i in range(n_req)], device=device)
    J = max(len(r.target) for r in rows)
    tids = torch.zeros(len(rows), J, dtype=torch.long, device=device)
    tmask = torch.zeros(len(rows), J, device=device)
    for k, r in enumerate(rows):
        if r.target:
            tids[k, : len(r.target)] = torch.tensor(r.target, device=device)
            tmask[k, : len(r.target)] = 1
    return RowTensors(torch.tensor([r.request for r in rows], device=device),
                      torch.tensor([r.is_kl for r in rows], device=device),
                      torch.tensor([r.is_old for r in rows], device=device), bare, tids, tmask)


def request_costs(rows: list[TargetRow], n_req: int, fast: bool) -> list[tuple[int, int]]:
    """Per request ``(rows, longest row)``, the row length counted as the forward pass runs it
    (``fast``: from the fact token on) plus the target tokens but the last."""
    costs = [(0, 0)] * n_req
    for r in rows:
        n, m = costs[r.request]
        length = (len(r.ids) - r.fact if fast else len(r.ids)) + max(len(r.target) - 1, 0)
        costs[r.request] = (n + 1, max(m, length))
    return costs
