"""One setup path from configs to a ready :class:`~blueedit.editing.editor.Editor`.

:func:`build_editor` is what :class:`blueedit.module.EditingModule` and every benchmark under
``benchmarks/`` call: it resolves the statistics corpus (``StatsConfig.corpus``, with the
model-sampled fallback), loads or collects ``C_0`` through the on-disk cache (one cache key for
``blueedit fit`` and the benchmarks), draws the context templates and assembles the editor
(``docs/algorithms.md`` §1 for the templates, §3 for ``C_0``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from blueedit.config import UserInputError
from blueedit.data.corpus import (
    CorpusUnavailable,
    corpus_files,
    corpus_fingerprint,
    load_corpus_texts,
    resolve_corpus_source,
)
from blueedit.editing.editor import EditingConfig, Editor, EditorState
from blueedit.editing.statistics import StatisticsCache, StatsConfig
from blueedit.editing.targets import generate_context_templates
from blueedit.models.adapters import ModelAdapter

__all__ = ["MIN_CHARS", "build_editor", "cached_key_statistics", "statistics_corpus"]

#: Shortest corpus text (characters) used for ``C_0``.
MIN_CHARS = 200


def statistics_corpus(stats: StatsConfig, data_dir: str | Path | None) -> str:
    """The concrete corpus ``stats.corpus`` stands for. ``auto`` without a Wikipedia sample in the
    data directory falls back to text sampled from the model itself, with a warning that says how
    to get the published statistics."""
    if stats.corpus == "model-samples":
        return "model-samples"
    try:
        return resolve_corpus_source(stats.corpus, data_dir)
    except CorpusUnavailable as e:
        if stats.corpus != "auto":
            raise CorpusUnavailable(f"stats.corpus: {e}") from e
        warnings.warn(
            f"{e}. C_0 is estimated on text sampled from the model itself (offline fallback); set "
            "data.data_dir or stats.corpus for the published statistics",
            stacklevel=3,
        )
        return "model-samples"


def cached_key_statistics(
    model,
    tokenizer,
    layers: Sequence[int],
    stats: StatsConfig,
    *,
    model_id: str,
    adapter: ModelAdapter | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    texts: Sequence[str] | None = None,
    single_pass: bool = True,
    progress: bool = True,
    checkpoint_every: int = 20,
    cache_keys: dict[int, str] | None = None,
) -> dict[int, torch.Tensor]:
    """``C_0^l`` (``[d_k, d_k]``) for ``layers``, from the on-disk cache or collected in one pass.

    Args:
        model, tokenizer: the unedited model (the cache key is computed from its weights).
        stats: corpus, number and length of texts, dtype; ``stats.cache_dir`` when ``cache_dir``
            is not given.
        model_id: a readable directory name for the cache entries.
        texts: use these texts instead of ``stats.corpus`` (tests, timing runs).
        single_pass: all layers in one pass (``False``: one pass per layer, the reference mode).
        progress: progress bars for sampling and collecting.
        checkpoint_every: batches between partial saves (resumable collection).
        cache_keys: when given, filled with the cache key of each layer's entry (what an edited
            model directory records, :mod:`blueedit.carry`).
    """
    from blueedit.models.loading import default_cache_dir

    adapter = adapter or ModelAdapter(model)
    layers = list(layers)
    if texts is not None:
        given = list(texts)
        corpus_id = corpus_fingerprint("given-texts", len(given), 0)

        def texts_fn() -> list[str]:
            return given
    else:
        source = statistics_corpus(stats, data_dir)
        if source == "model-samples":
            corpus_id = corpus_fingerprint(f"model-samples-{stats.max_length}", stats.num_samples, 0, seed=0)

            def texts_fn() -> list[str]:
                from blueedit.models.sampling import model_sampled_texts

                # one large batch: generation is latency-bound (one decode step per token)
                return model_sampled_texts(model, tokenizer, num_samples=stats.num_samples,
                                           max_new_tokens=stats.max_length, seed=0, batch_size=64, progress=progress)
        else:
            try:
                files = corpus_files(source, data_dir)
            except CorpusUnavailable as e:
                raise CorpusUnavailable(f"stats.corpus: {e}") from e
            corpus_id = corpus_fingerprint(source, stats.num_samples, MIN_CHARS, files=files)

            def texts_fn() -> list[str]:
                try:
                    return load_corpus_texts(source, data_dir=data_dir, num_samples=stats.num_samples,
                                             min_chars=MIN_CHARS)
                except CorpusUnavailable as e:
                    raise CorpusUnavailable(f"stats.corpus: {e}") from e
    root = Path(cache_dir or stats.cache_dir or default_cache_dir()).expanduser()
    cache = StatisticsCache(root, model_id, checkpoint_every=checkpoint_every, progress=progress)
    collected = cache.get_or_collect(model, adapter, tokenizer, layers, stats, corpus_id, texts_fn,
                                     single_pass=single_pass)
    if cache_keys is not None:
        cache_keys.update(cache.keys)
    return {l: s.mom2 for l, s in collected.items()}


def build_editor(
    model,
    tokenizer,
    editing: EditingConfig,
    stats: StatsConfig | None = None,
    *,
    model_id: str | None = None,
    adapter: ModelAdapter | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    mom2: dict[int, torch.Tensor] | None = None,
    context_templates: list[str] | None = None,
    state: EditorState | None = None,
    texts: Sequence[str] | None = None,
    progress: bool = True,
) -> Editor:
    """An :class:`Editor` for ``model`` set up from configs.

    ``model_id`` names the statistics cache directory (default: the model's class name).
    ``mom2`` and ``context_templates``, when given (e.g. computed once for several runs on one
    model), are used as they are; otherwise ``C_0`` comes from :func:`cached_key_statistics` on
    the edited layers (``stats``; ``editing.optimize`` decides one pass or one per layer) and the
    templates from :func:`~blueedit.editing.targets.generate_context_templates`. Both must be
    computed on the unedited model. ``state`` resumes an editor (history, projections, rounds).
    """
    adapter = adapter or ModelAdapter(model)
    adapter.check_layers(editing.layers)
    layers = editing.edited_layers
    if mom2 is None:
        mom2 = cached_key_statistics(model, tokenizer, layers, stats or StatsConfig(),
                                     model_id=model_id or type(model).__name__,
                                     adapter=adapter, data_dir=data_dir, cache_dir=cache_dir, texts=texts,
                                     single_pass=editing.optimize, progress=progress)
    if context_templates is None:
        context_templates = generate_context_templates(model, tokenizer)
    missing = [l for l in layers if l not in mom2]
    if missing:
        raise UserInputError(f"no key statistics C_0 for layers {missing}")
    editor = Editor(model, tokenizer, adapter, editing, {l: mom2[l] for l in layers}, context_templates)
    if state is not None:
        editor.state = EditorState.from_dict(state.to_dict(), editor.device)
    return editor
