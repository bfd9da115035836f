"""Preservation statistics ``C_0^l = E[k kᵀ]`` of the keys at ``W_out^l`` over a text corpus.

One streaming pass collects every requested layer at once and stops after the deepest one.
Results are cached on disk and reused across runs. The cache cannot be silently wrong:

- an entry's key is computed from the model's *content* (config, tokenizer and the weights
  ``C_0^l`` depends on, :func:`~blueedit.models.loading.model_content_fingerprints`), the layer and
  module, the corpus (its resolved source and file content, see
  :func:`~blueedit.data.corpus.corpus_fingerprint`) and every collection setting;
- an entry is a safetensors file whose metadata holds its key and the SHA-256 of its tensor; both
  are verified on load. A damaged or mismatched entry is reported (a
  :class:`StatisticsCacheWarning` naming its path) and recomputed, never used;
- every file is written to a uniquely named temporary file and renamed into place, so processes
  filling the same cache at once never leave a half-written entry.

An interrupted collection resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blueedit import distributed
from blueedit.config import StatsConfig, UserInputError
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import forward, traced
from blueedit.models.loading import model_content_fingerprints, tensor_digest
from blueedit.models.tokens import pad_batch, pad_token_id

log = logging.getLogger(__name__)

#: Version of the cache layout; part of every key.
CACHE_FORMAT = "c0-v2"


class StatisticsCacheWarning(UserWarning):
    """A statistics cache entry was damaged or did not match its key; it is recomputed."""


@dataclass
class LayerStats:
    """``mom2`` = ``E[k kᵀ]`` (``[d_k, d_k]``) over ``count`` tokens."""

    mom2: torch.Tensor
    count: int


def stats_key(model_id: str, layer: int, module: str, corpus_id: str, num_samples: int, max_length: int, dtype: str,
              max_tokens: int | None = None) -> str:
    """The cache key of one layer's statistics: every input that changes the result.

    ``model_id`` must identify the model's content (see
    :func:`~blueedit.models.loading.model_content_fingerprints`), not just its name."""
    payload = json.dumps([CACHE_FORMAT, model_id, layer, module, corpus_id, num_samples, max_length, dtype]
                         + ([max_tokens] if max_tokens else []))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tokenize_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 0:
            out.append(list(ids))
    return out


@torch.no_grad()
def accumulate_key_moments(
    model,
    adapter: ModelAdapter,
    tokenizer,
    texts: list[str],
    layers: list[int],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    state: dict | None = None,
    on_batch: Callable[[dict], None] | None = None,
    stop_early: bool = True,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Sum ``k kᵀ`` (float64) over every non-padding token of ``texts`` at each layer's ``W_out``.

    One forward per batch serves all ``layers`` and, with ``stop_early``, ends after the deepest.
    ``state`` (``{"sums": {l: [d_k, d_k]}, "count": int, "done": int}``) resumes a partial pass;
    ``on_batch(state)`` is called after each batch (for checkpoints and progress). The pass ends
    once ``max_tokens`` tokens were counted; ``progress`` shows a progress bar.
    """
    device = next(model.parameters()).device
    token_lists = _tokenize_texts(tokenizer, texts, max_length)
    if state is None:
        state = {"sums": {l: torch.zeros(adapter.key_size(l), adapter.key_size(l), dtype=torch.float64) for l in layers},
                 "count": 0, "done": 0}
    pad = pad_token_id(tokenizer)
    stop = max(layers) if stop_early else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(token_lists), initial=state["done"], desc=f"key statistics {layers}", unit="text")
    for start in range(state["done"], len(token_lists), batch_size):
        if max_tokens is not None and state["count"] >= max_tokens:
            break
        chunk = token_lists[start : start + batch_size]
        batch = pad_batch(chunk, [-1] * len(chunk), pad_id=pad, padding_side="right").to(device)
        with traced(adapter, key_layers=layers, stop_after=stop) as tr:
            forward(model, batch)
        mask = batch.attention_mask.bool()
        for l in layers:
            k = tr.keys[l][mask].to(torch.float64)  # [tokens, d_k]
            state["sums"][l] += (k.T @ k).cpu()
        state["count"] += int(mask.sum())
        state["done"] = start + len(chunk)
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(tokens=state["count"])
        if on_batch is not None:
            on_batch(state)
    if bar is not None:
        bar.close()
    return state


def key_statistics(model, tokenizer, layers: list[int], texts: list[str], *, max_length: int = 256,
                   batch_size: int = 8, dtype: torch.dtype = torch.float32,
                   adapter: ModelAdapter | None = None) -> dict[int, torch.Tensor]:
    """``C_0^l = E[k kᵀ]`` (``[d_k, d_k]``) for every layer in ``layers``, over every token of
    ``texts`` (docs/algorithms.md §4): one pass, accumulated in float64, nothing
    cached (:class:`StatisticsCache` caches and resumes)."""
    adapter = adapter or ModelAdapter(model)
    state = accumulate_key_moments(model, adapter, tokenizer, texts, layers, max_length=max_length,
                                   batch_size=batch_size)
    if state["count"] == 0:
        raise UserInputError("key_statistics: the texts hold no tokens")
    return {l: (state["sums"][l] / state["count"]).to(dtype) for l in layers}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a unique temporary file beside ``path``, flushed to disk, then renamed over
    ``path`` (atomic on POSIX): a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_single_tensor(path: Path, name: str) -> tuple[torch.Tensor, dict[str, str]]:
    """Tensor ``name`` and the metadata of a safetensors file, read through one open file handle.

    (``safetensors.safe_open`` re-opens the file by name for the tensor data, so a concurrent
    rename between reading the header and the data would mix two files.) Raises ``ValueError``
    for a file that is not a well-formed safetensors file of that tensor.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) != 8:
            raise UserInputError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise UserInputError(f"header length {n} does not fit in a {size}-byte file")
        header = json.loads(fh.read(n))
        info = header[name]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        out = torch.empty([int(d) for d in info["shape"]], dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if end - begin != nbytes or 8 + n + end > size:
            raise UserInputError(f"tensor {name!r} needs {nbytes} bytes at {begin}..{end}, the file has {size}")
        fh.seek(8 + n + begin)
        if nbytes and fh.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != nbytes:
            raise UserInputError("truncated tensor data")
    return out, dict(header.get("__metadata__") or {})


class StatisticsCache:
    """``C_0`` per layer on disk: ``<root>/stats/<model_id>/<key>.safetensors`` plus a JSON
    description (for people; the safetensors metadata is what is verified).

    ``model_id`` is only a readable directory name; the keys are computed from the model's
    content. Partial collections are saved as ``partial-<key>.pt`` every ``checkpoint_every``
    batches and resumed by the next call with the same inputs.
    """

    def __init__(self, root: str | Path, model_id: str, checkpoint_every: int = 20, progress: bool = False):
        self.dir = Path(root).expanduser() / "stats" / model_id
        self.model_id = model_id
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self._fingerprints: dict[int, str] = {}
        self.keys: dict[int, str] = {}

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _reject(self, path: Path, why: str) -> None:
        warnings.warn(f"statistics cache entry {path} {why}; it is ignored and recomputed",
                      StatisticsCacheWarning, stacklevel=3)

    def load(self, key: str) -> LayerStats | None:
        """The verified entry for ``key``; ``None`` (with a :class:`StatisticsCacheWarning` naming
        the file) when it is missing, unreadable, for another key or fails its checksum."""
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            mom2, meta = _read_single_tensor(p, "mom2")
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated, overwritten, not safetensors
            self._reject(p, f"is unreadable ({type(e).__name__}: {e})")
            return None
        if meta.get("key") != key:
            self._reject(p, f"holds key {meta.get('key')!r}, not {key!r}")
            return None
        if meta.get("sha256") != tensor_digest(mom2):
            self._reject(p, "fails its checksum (the file is damaged)")
            return None
        try:
            count = int(meta["count"])
        except (KeyError, ValueError):
            self._reject(p, "has no token count")
            return None
        return LayerStats(mom2, count)

    def save(self, key: str, stats: LayerStats, meta: dict) -> None:
        from safetensors.torch import save_file

        mom2 = stats.mom2.detach().cpu().contiguous()
        header = {"key": key, "sha256": tensor_digest(mom2), "count": str(int(stats.count)),
                  "format": CACHE_FORMAT, "description": json.dumps(meta, default=str)}
        atomic_write(self._path(key), lambda tmp: save_file({"mom2": mom2}, str(tmp), metadata=header))
        atomic_write(self.dir / f"{key}.json",
                     lambda tmp: tmp.write_text(json.dumps({**meta, "key": key}, indent=1, default=str)))

    def get_or_collect(
        self,
        model,
        adapter: ModelAdapter,
        tokenizer,
        layers: list[int],
        spec: StatsConfig,
        corpus_id: str,
        texts_fn: Callable[[], list[str]],
        *,
        single_pass: bool = True,
    ) -> dict[int, LayerStats]:
        """Statistics for ``layers``: cached ones are loaded; the missing ones are collected in one
        pass (``single_pass``) or one pass per layer (the reference mode), then cached.

        ``model`` must hold the weights the statistics are for (the unedited ones): the keys are
        computed from its content."""
        fingerprints = model_content_fingerprints(model, tokenizer, layers, blocks=adapter.layout.blocks,
                                                  skip_modules=[adapter.final_norm, adapter.lm_head])
        keys = {l: stats_key(fingerprints[l], l, adapter.layout.w_out, corpus_id, spec.num_samples,
                             spec.max_length, spec.dtype, spec.max_tokens)
                for l in layers}
        self._fingerprints = fingerprints
        #: the cache key of each layer's entry (what an edited model directory records)
        self.keys = dict(keys)
        out = {l: s for l in layers if (s := self.load(keys[l])) is not None}
        missing = [l for l in layers if l not in out]
        if not missing:
            return out
        texts = texts_fn()
        groups = [missing] if single_pass else [[l] for l in missing]
        for group in groups:
            out.update(self._collect(model, adapter, tokenizer, group, spec, corpus_id, texts, keys, single_pass))
        return out

    def _collect(self, model, adapter, tokenizer, layers, spec, corpus_id, texts, keys, stop_early) -> dict[int, LayerStats]:
        # under DDP each rank sums over its strided shard of the texts; the sums are all-reduced
        rank, world = distributed.rank_and_world()
        texts = distributed.shard(texts)
        partial_key = hashlib.sha256("|".join(keys[l] for l in layers).encode()).hexdigest()[:16]
        suffix = f"-rank{rank}of{world}" if world > 1 else ""
        partial = self.dir / f"partial-{partial_key}{suffix}.pt"
        state = None
        if partial.is_file():
            try:
                blob = torch.load(partial, map_location="cpu", weights_only=True)
                state = {"sums": {int(l): blob["sums"][str(l)] for l in layers}, "count": int(blob["count"]),
                         "done": int(blob["done"])}
                log.info("resuming key statistics for layers %s at text %d", layers, state["done"])
            except Exception as e:
                warnings.warn(f"partial statistics {partial} are unreadable ({type(e).__name__}: {e}); "
                              "collecting from the start", StatisticsCacheWarning, stacklevel=2)
        t0 = time.time()
        n_batches = [0]

        def checkpoint(st: dict) -> None:
            n_batches[0] += 1
            if n_batches[0] % self.checkpoint_every == 0:
                blob = {"sums": {str(l): v for l, v in st["sums"].items()}, "count": torch.tensor(st["count"]),
                        "done": torch.tensor(st["done"])}
                atomic_write(partial, lambda tmp: torch.save(blob, tmp))
                log.info("key statistics: %d/%d texts, %d tokens, %.0f tokens/s", st["done"], len(texts), st["count"],
                         st["count"] / max(time.time() - t0, 1e-9))

        state = accumulate_key_moments(
            model, adapter, tokenizer, texts, layers, max_length=spec.max_length, batch_size=spec.batch_size,
            state=state, on_batch=checkpoint, stop_early=stop_early,
            max_tokens=None if spec.max_tokens is None else -(-spec.max_tokens // world),
            progress=self.progress and rank == 0,
        )
        if world > 1:
            device = next(model.parameters()).device
            for l in layers:
                state["sums"][l] = distributed.all_reduce_sum(state["sums"][l].to(device)).cpu()
            count = distributed.all_reduce_sum(torch.tensor([float(state["count"])], dtype=torch.float64, device=device))
            state["count"] = int(count.item())
        if state["count"] == 0:
            raise RuntimeError(f"stats.corpus {corpus_id!r} produced no tokens")
        from blueedit.models.loading import parse_dtype

        out = {}
        for l in layers:
            stats = LayerStats((state["sums"][l] / state["count"]).to(parse_dtype(spec.dtype)), state["count"])
            meta = {"model": self.model_id, "model_fingerprint": self._fingerprints.get(l), "layer": l,
                    "module": adapter.layout.w_out, **asdict(spec),
                    "corpus_id": corpus_id, "tokens": state["count"], "processes": world}
            if rank == 0:  # every rank holds the same sums; one writes the cache
                self.save(keys[l], stats, meta)
            out[l] = stats
        partial.unlink(missing_ok=True)
        distributed.barrier()
        return out
