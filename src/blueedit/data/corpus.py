"""Texts for the key covariance statistics (``C = K0 K0^T``) that MEMIT / AlphaEdit need.

Sources for :func:`load_corpus_texts`:

``wikipedia-sample``
    ``<data_dir>/corpus/enwiki_wikiextractor_sample.jsonl.gz``: pages with at least ``min_chars``
    characters, the first ``num_samples`` in file order (streamed, so only what is needed is read).
``wikitext-2``
    ``<data_dir>/corpus/wikitext-2/{valid,test}.txt.gz``: consecutive paragraphs of one article
    joined until they reach ``min_chars`` characters, in file order.
``hub:wikitext``
    ``Salesforce/wikitext`` (``wikitext-103-raw-v1``, train) from the Hugging Face Hub, grouped the
    same way; ``seed`` picks the subset.
``hub:wikipedia``
    ``wikimedia/wikipedia`` (``20231101.en``, train), streamed and shuffled with ``seed`` in a
    buffer; the first ``num_samples`` long-enough articles are kept.
``auto``
    ``wikipedia-sample`` when the data directory has it, else :class:`CorpusUnavailable`.

When no corpus can be read at all (offline, no data directory),
:func:`blueedit.models.sampling.model_sampled_texts` draws texts from the model itself, a cheap
stand-in for its pre-training distribution.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from blueedit.config import UserInputError
from blueedit.data.formats import DATA_DIR_ENV, data_file, resolve_data_dir

__all__ = [
    "CORPUS_SOURCES",
    "CorpusUnavailable",
    "corpus_files",
    "corpus_fingerprint",
    "file_identity",
    "load_corpus_texts",
    "resolve_corpus_source",
]

#: Corpus sources understood by :func:`load_corpus_texts`.
CORPUS_SOURCES: tuple[str, ...] = ("auto", "wikipedia-sample", "wikitext-2", "hub:wikitext", "hub:wikipedia")

WIKIPEDIA_SAMPLE = "corpus/enwiki_wikiextractor_sample.jsonl.gz"
WIKITEXT2_FILES = ("corpus/wikitext-2/valid.txt.gz", "corpus/wikitext-2/test.txt.gz")



class CorpusUnavailable(RuntimeError):
    """A corpus source cannot be read (missing file, no data directory, no network)."""


def _data_file(data_dir: str | Path | None, rel: str, source: str) -> Path:
    try:
        return data_file(data_dir, rel, f"corpus {source!r}")
    except FileNotFoundError as err:
        raise CorpusUnavailable(f"{err}; or use hub:wikipedia / model-sampled texts") from err


def resolve_corpus_source(source: str, data_dir: str | Path | None = None) -> str:
    """The concrete source that ``source`` stands for (``auto`` -> ``wikipedia-sample``)."""
    if source not in CORPUS_SOURCES:
        raise UserInputError(f"unknown corpus source {source!r}; expected one of {CORPUS_SOURCES}")
    if source != "auto":
        return source
    root = resolve_data_dir(data_dir)
    if root is not None and (root / WIKIPEDIA_SAMPLE).is_file():
        return "wikipedia-sample"
    where = "no data directory is set" if root is None else f"{root / WIKIPEDIA_SAMPLE} does not exist"
    raise CorpusUnavailable(
        f"corpus 'auto': {where}; set data_dir (or {DATA_DIR_ENV}), choose hub:wikipedia, "
        "or fall back to model-sampled texts"
    )


def _wikipedia_sample(path: Path, num_samples: int, min_chars: int) -> list[str]:
    texts: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) >= num_samples:
                break
            if not line.strip():
                continue
            text = json.loads(line).get("text") or ""
            if len(text) >= min_chars:
                texts.append(text)
    return texts


_WIKITEXT_FIXES = (
    (re.compile(r" @(.)@ "), r"\1"),  # " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> "."
    (re.compile(r" ([.,;:!?')\]])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
)


def _detokenize_wikitext(line: str) -> str:
    text = line.strip()
    for pattern, repl in _WIKITEXT_FIXES:
        text = pattern.sub(repl, text)
    return text


def _wikitext_chunks(lines: Iterable[str], min_chars: int) -> Iterator[str]:
    """Join consecutive paragraphs of one article until a chunk has ``min_chars`` characters.

    A top-level heading (`` = Title = ``) starts a new article and drops an unfinished short chunk;
    section headings (`` = = Section = = ``) are skipped.
    """
    chunk: list[str] = []
    size = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("=") and line.endswith("="):
            if not line.startswith("= ="):
                chunk, size = [], 0
            continue
        paragraph = _detokenize_wikitext(line)
        size += len(paragraph) + (1 if chunk else 0)
        chunk.append(paragraph)
        if size >= min_chars:
            yield " ".join(chunk)
            chunk, size = [], 0


def _gz_lines(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            yield from fh


def _hub_wikitext(num_samples: int, min_chars: int, seed: int) -> list[str]:
    import datasets

    ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train")
    chunks = list(_wikitext_chunks(ds["text"], min_chars))
    if len(chunks) > num_samples:
        chunks = random.Random(seed).sample(chunks, num_samples)
    return chunks


def _hub_wikipedia(num_samples: int, min_chars: int, seed: int) -> list[str]:
    import datasets

    ds = datasets.load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
    ds = ds.shuffle(seed=seed, buffer_size=10_000)
    texts = (row["text"] for row in ds if len(row.get("text") or "") >= min_chars)
    return list(itertools.islice(texts, num_samples))


def load_corpus_texts(
    source: str,
    *,
    data_dir: str | Path | None = None,
    num_samples: int,
    min_chars: int = 200,
    seed: int = 0,
) -> list[str]:
    """Up to ``num_samples`` texts of at least ``min_chars`` characters from ``source``.

    ``seed`` only matters for the Hub sources (local sources are read in file order). Fewer texts
    than asked for is a warning, not an error.

    Raises:
        CorpusUnavailable: the source cannot be read.
        ValueError: an unknown source or a bad option.
    """
    if num_samples < 1:
        raise UserInputError(f"num_samples must be >= 1, got {num_samples}")
    if min_chars < 0:
        raise UserInputError(f"min_chars must be >= 0, got {min_chars}")
    resolved = resolve_corpus_source(source, data_dir)
    try:
        if resolved == "wikipedia-sample":
            path = _data_file(data_dir, WIKIPEDIA_SAMPLE, resolved)
            texts = _wikipedia_sample(path, num_samples, min_chars)
        elif resolved == "wikitext-2":
            paths = [_data_file(data_dir, rel, resolved) for rel in WIKITEXT2_FILES]
            texts = list(itertools.islice(_wikitext_chunks(_gz_lines(paths), min_chars), num_samples))
        elif resolved == "hub:wikitext":
            texts = _hub_wikitext(num_samples, min_chars, seed)
        else:
            texts = _hub_wikipedia(num_samples, min_chars, seed)
    except CorpusUnavailable:
        raise
    except (OSError, ValueError, ConnectionError) as err:
        raise CorpusUnavailable(f"corpus {resolved!r} could not be read: {err}") from err
    if not texts:
        raise CorpusUnavailable(f"corpus {resolved!r} has no text of at least {min_chars} characters")
    if len(texts) < num_samples:
        warnings.warn(
            f"corpus {resolved!r} gave {len(texts)} texts of >= {min_chars} characters, "
            f"fewer than the {num_samples} asked for",
            stacklevel=2,
        )
    return texts


def corpus_files(source: str, data_dir: str | Path | None = None) -> list[Path]:
    """The local files a resolved corpus ``source`` is read from (none for Hub sources)."""
    if source == "wikipedia-sample":
        return [_data_file(data_dir, WIKIPEDIA_SAMPLE, source)]
    if source == "wikitext-2":
        return [_data_file(data_dir, rel, source) for rel in WIKITEXT2_FILES]
    return []


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str | Path) -> str:
    """The SHA-256 of a file's content (memoized per path, size and modification time): the same
    text copied elsewhere has the same identity, a changed file a different one."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def corpus_fingerprint(source: str, num_samples: int, min_chars: int, *, seed: int | None = None,
                       files: Iterable[str | Path] = ()) -> str:
    """A short, stable, file-name-safe key for statistics computed on a corpus.

    Pass the resolved source (see :func:`resolve_corpus_source`), ``seed`` when it changes the
    texts (Hub sources, model-sampled texts), and the corpus ``files`` (see :func:`corpus_files`),
    whose content identities enter the key.
    """
    parts: list[Any] = [source, int(num_samples), int(min_chars)]
    if seed is not None:
        parts.append(int(seed))
    identities = [file_identity(f) for f in files]
    if identities:
        parts.append(identities)
    digest = hashlib.sha1(json.dumps(parts).encode("utf-8")).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-") or "corpus"
    return f"{name}_n{num_samples}_c{min_chars}_{digest}"
