"""The ``blueedit`` command: LightningCLI with ``fit``, ``edit``, ``validate`` and ``test``.

- ``blueedit fit --config CONFIG``: a sequential editing experiment, evaluated before and after.
- ``blueedit edit --config CONFIG --edits FILE --output DIR``: apply the edits in FILE and save
  the edited model as a Hugging Face directory with ``edits.json`` and its editor state
  (:mod:`blueedit.carry`); ``edit`` / ``fit`` on such a directory continue its editing.
- ``blueedit revert DIR --rounds K`` (:func:`blueedit.carry.revert`) and ``blueedit generate DIR``
  (:mod:`blueedit.evaluation.side_by_side`) are plain commands beside the Lightning ones.
- ``blueedit locate --model MODEL``: causal tracing to find the critical layers (:mod:`blueedit.locate`).
- ``blueedit bench NAME``: a benchmark of :mod:`blueedit.bench` (the same as ``python -m blueedit.bench.NAME``).

Everything that can be checked without the model is checked before it is loaded (the records,
the output directory, the model path, callback options); a bad record or option prints one line
and exits with status 2 (``--verbose`` or ``BLUEEDIT_VERBOSE=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from blueedit.callbacks.plan import EditPlan
from blueedit.callbacks.progress import RoundProgressBar
from blueedit.cli_help import ShortHelpFormatter, add_help_options, description
from blueedit.config import UserInputError
from blueedit.config_headers import warn_placeholder_layers
from blueedit.data.corpus import CorpusUnavailable
from blueedit.data.datamodule import EditDataModule
from blueedit.data.records import check_prompt_lengths, effective_prompt_limit
from blueedit.module import EditingModule

log = logging.getLogger(__name__)

#: Environment variable that makes user errors show their traceback (like ``--verbose``).
VERBOSE_ENV = "BLUEEDIT_VERBOSE"

#: Files that mark a directory as a saved model (or a previous ``blueedit edit`` output).
MODEL_MARKERS = ("config.json", "edits.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin")


class OutputPathError(UserInputError):
    """``--output`` cannot be written, or would replace something without ``--overwrite``."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(output: str | Path, overwrite: bool = False) -> Path:
    """Check ``--output`` before any slow work; return it as a resolved path.

    Refused: an existing file; a directory holding a saved model (unless ``overwrite``); any
    other non-empty directory (even with ``overwrite``: it is not ours to delete); a location
    where the process cannot create files (probed by creating one).
    """
    out = Path(output).expanduser().absolute()
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutputPathError(f"--output {str(output)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        is_model = any((out / m).exists() for m in MODEL_MARKERS)
        if not is_model:
            raise OutputPathError(f"--output {str(output)!r} is a non-empty directory that is not a saved model; "
                                  "choose a new or empty directory")
        if not overwrite:
            raise OutputPathError(f"--output {str(output)!r} already holds a model; pass --overwrite to replace it")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise OutputPathError(f"--output {str(output)!r}: {parent} is not a directory")
    try:  # the edited model is written beside the target and renamed: that directory must be writable
        fd, probe = tempfile.mkstemp(prefix=".blueedit-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"--output {str(output)!r}: cannot write in {parent} ({e.strerror or e})") from None
    return out


class EditTrainer(Trainer):
    """A Trainer with an ``edit`` entry point (its signature defines ``blueedit edit``'s options)."""

    def edit(
        self,
        model: EditingModule,
        edits: str,
        output: str,
        datamodule: EditDataModule | None = None,
        ckpt_path: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Apply the edits in ``edits`` (JSON/JSONL, the user format) and save to ``output``.

        Args:
            model: the editing module.
            edits: path of the edit records.
            output: directory for the edited model (``save_pretrained`` of model and tokenizer)
                and ``edits.json``; written to a temporary directory beside it and renamed into
                place at the end, so it never holds a half-written model.
            datamodule: its ``dataset`` is replaced by ``edits``; ``edits_per_round`` is kept.
            ckpt_path: resume an interrupted edit from this checkpoint.
            overwrite: replace ``output`` when it already holds a model.
        """
        if not Path(edits).is_file():
            raise FileNotFoundError(f"--edits {edits!r}: no such file")
        check_output_dir(output, overwrite)
        dm = datamodule or EditDataModule()
        if dm.dataset != edits or dm._requests is None:
            dm.dataset, dm.format, dm.num_edits, dm._requests = edits, "auto", None, None
        dm.setup("fit")  # validates every record before anything is loaded onto the model
        self.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        error: Exception | None = None
        if self.is_global_zero:  # every rank holds the same weights; one writes them
            try:
                save_edited_model(model, dm, output, overwrite=overwrite)
            except Exception as e:
                error = e
        if self.strategy.broadcast(error is not None):  # rank 0's outcome, on every rank
            where = self._rescue()  # every rank takes part: the checkpoint write synchronizes them
            cause = f"{type(error).__name__}: {error}" if error is not None else "on rank 0"
            raise OSError(f"writing the edited model to {output} failed ({cause}); {where}") from error
        self.strategy.barrier("blueedit-edit-saved")
        return Path(output)

    def _rescue(self) -> str:
        """Say where the editing survives when the model could not be saved: the last checkpoint
        of a checkpoint callback, else a checkpoint written now with :meth:`save_checkpoint` (the
        edited matrices and the editor state, tens of MB for small models). Called on every rank."""
        callback = self.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if last and Path(last).is_file():
            return f"the run's last checkpoint is {last}: resume with --ckpt_path {last}"
        path = self.strategy.broadcast(Path(self.default_root_dir) / f"edit-rescue-{uuid.uuid4().hex[:8]}.ckpt")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.save_checkpoint(path)
        except Exception as e:
            return f"saving a rescue checkpoint to {path} failed too ({e}); the edits are lost"
        return f"the edits are saved in the checkpoint {path}: resume with --ckpt_path {path}"


def save_edited_model(module: EditingModule, datamodule: EditDataModule, output: str | Path,
                      overwrite: bool = False) -> Path:
    """``save_pretrained`` of the edited model and tokenizer, plus ``edits.json``, written to a
    temporary directory beside ``output`` and renamed into place: ``output`` is either absent, the
    old model (``overwrite``) or the complete new one, never a half-written one."""
    out = Path(output).expanduser().absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        module.method.save_model(module, tmp)
        module.tokenizer.save_pretrained(tmp)
        previous = module.carried.record if getattr(module, "carried", None) is not None else {}
        record = {
            "base_model": previous.get("base_model", module.model_spec.name_or_path),
            "method": module.hp.method,
            "strategy": module.hp.strategy,
            "layers": module.hp.edited_layers,
            "critical_layers": list(module.hp.layers),
            "rounds": list(previous.get("rounds", [])) + [
                {"index": r.index, "case_ids": r.case_ids, "seconds": r.seconds,
                 "update_norms": {str(k): v for k, v in r.update_norms.items()}}
                for r in module.reports
            ],
            "requests": list(previous.get("requests", [])) + [r.to_dict() for r in datamodule.requests],
        }
        (tmp / "edits.json").write_text(json.dumps(record, indent=1, default=str))
        # what `edit` on this directory and `revert` need (a side-memory method saves its memory instead)
        if getattr(module, "editor", None) is not None and module.method.carries_state:
            from blueedit import carry

            try:
                print(carry.describe_saved(carry.save_state(tmp, module)))
            except carry.CarryError as e:  # the model itself is fine: save it without the state
                warnings.warn(f"{e}: the editor state is not saved; {out} cannot be continued or reverted",
                              stacklevel=2)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise OutputPathError(f"--output {str(output)!r} appeared while editing; pass --overwrite to replace it")
            from blueedit.carry import replace_directory

            print(f"replacing the model in {out} (--overwrite)")  # the caller runs this on rank zero only
            replace_directory(tmp, out)  # an atomic swap where the system has one
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _known_general_tasks() -> tuple[str, ...]:
    from blueedit.evaluation.general import TASKS

    return tuple(TASKS)


def check_callbacks(callbacks: Any) -> None:
    """Options of the project's callbacks that can be checked without the model (task names)."""
    for cb in callbacks or []:
        class_path = str(getattr(cb, "class_path", "") or "")
        if class_path.rsplit(".", 1)[-1] != "GeneralCapability":
            continue
        init = getattr(cb, "init_args", None)
        tasks = init.get("tasks") if init is not None else None
        if tasks is None:
            continue
        known = _known_general_tasks()
        bad = [t for t in tasks if t not in known]
        if bad:
            raise UserInputError(f"GeneralCapability tasks {bad} are unknown; known tasks: {', '.join(known)}")


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, dict):
        return dict(value)
    return dict(vars(value))


def evaluated_model_dir_name(name_or_path: str) -> str:
    """A directory name for the evaluated model: a local directory's or file's own name
    (``edited/`` -> ``edited``), a hub id with ``/`` as ``--`` (``gpt2-xl``,
    ``meta-llama--Meta-Llama-3-8B``)."""
    text = str(name_or_path).rstrip("/\\")
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve().name
    return text.replace("/", "--").replace("\\", "--") or "model"


class _NoAdvertising(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing <service>" lines (nothing for the user to do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """The command's quiet defaults: no advertising tips, and no warning about the language model
    being in eval mode when fitting starts (:class:`~blueedit.module.EditingModule` keeps it in eval
    mode on purpose: editing never trains it, and dropout would corrupt targets and keys)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertising) for f in logger.filters):
            logger.addFilter(_NoAdvertising())
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Lightning's own use of a torch API that torch now deprecates: nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # EditingModule numbers the rounds of a continued model directory in on_before_batch_transfer;
    # Lightning notes that the module's hook is used rather than the data module's (it has none)
    warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")


class BlueEditCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)  # editing has nothing to predict
        commands["edit"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_dir", "model.data_dir")
        add_help_options(parser)  # --help-all beside the short --help

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The default logger (``logger: true``) is a :class:`CSVLogger` under ``default_root_dir``,
        chosen here rather than by Lightning, which warns when TensorBoard is not installed; an
        :class:`~blueedit.callbacks.plan.EditPlan` prints the run's plan."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config.get("trainer", {}) or {}
        if "logger" not in kwargs and trainer_cfg.get("logger", True) in (True, None):
            kwargs["logger"] = CSVLogger(save_dir=trainer_cfg.get("default_root_dir") or os.getcwd())
        trainer = super().instantiate_trainer(**kwargs)
        # the run's plan (records, rounds) before its first round, a time estimate after it
        if not any(isinstance(c, EditPlan) for c in trainer.callbacks):
            trainer.callbacks.insert(0, EditPlan())
        # Lightning's default bar ("Epoch 0/0 ... v_num") becomes one that counts rounds
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) in (TQDMProgressBar, RichProgressBar):  # the default, not one the user chose
                trainer.callbacks[i] = RoundProgressBar()
        return trainer

    def before_instantiate_classes(self) -> None:
        """Check what can be checked before the model is loaded (which takes minutes for 8B);
        ``validate`` / ``test`` write under ``<default_root_dir>/<stage>/<model name>``."""
        self._preloaded = None
        sub = self.subcommand
        if sub in ("validate", "test"):
            cfg = self.config[sub]
            name = _as_dict(_as_dict(cfg.get("model")).get("model")).get("name_or_path") or "model"
            root = cfg["trainer"].get("default_root_dir") or os.getcwd()
            cfg["trainer"]["default_root_dir"] = str(Path(root) / sub / evaluated_model_dir_name(name))
        if sub not in ("fit", "edit"):
            return
        cfg = self.config[sub]
        check_callbacks(cfg.get("trainer", {}).get("callbacks"))
        model_cfg = _as_dict(cfg.get("model"))
        warn_placeholder_layers(cfg.get("config"), _as_dict(model_cfg.get("editing")).get("layers"))
        from blueedit.models.loading import ModelConfig, check_model_source

        spec = ModelConfig(**_as_dict(model_cfg.get("model"))) if model_cfg.get("model") is not None else ModelConfig()
        data_cfg = _as_dict(cfg.get("data"))
        if sub == "edit":
            edits = cfg.get("edits")
            if not edits or not Path(edits).is_file():
                raise FileNotFoundError(f"--edits {edits!r}: no such file")
            check_output_dir(cfg.get("output"), bool(cfg.get("overwrite")))
            data_cfg.update(dataset=edits, format="auto", num_edits=None)
        dm = EditDataModule(**data_cfg)
        dm.setup("fit")  # every record parsed and validated
        check_model_source(spec)
        self._check_continuation(spec, model_cfg)
        effective_prompt_limit(model_cfg.get("max_prompt_tokens", 512), None)
        self._cheap_model_checks(spec, model_cfg, dm)
        self._preloaded = (data_cfg, dm._requests)

    @staticmethod
    def _check_continuation(spec, model_cfg: dict[str, Any]) -> None:
        """Continuing an edited model directory: its editor state must fit this run's settings
        (read from the state file's header, before the model is loaded)."""
        from dataclasses import asdict

        from blueedit import carry
        from blueedit.editing.editor import EditingConfig
        from blueedit.editing.statistics import StatsConfig

        if not carry.has_state(spec.name_or_path):
            return
        header = carry.read_header(spec.name_or_path)
        editing = _as_dict(model_cfg.get("editing")) or asdict(EditingConfig())
        stats = _as_dict(model_cfg.get("stats")) or asdict(StatsConfig())
        now = {"model": {"dtype": spec.dtype}, "editing": editing, "stats": stats}
        if getattr(spec, "chat_template", False):
            now["model"]["chat_template"] = True
        saved = dict(header["meta"]["settings"])
        saved["model"] = {k: v for k, v in saved.get("model", {}).items() if k in ("dtype", "chat_template")}
        carry.check_settings(spec.name_or_path, saved, now)

    @staticmethod
    def _cheap_model_checks(spec, model_cfg: dict[str, Any], dm: EditDataModule) -> None:
        """Check prompt lengths and the editing layers against the model's tokenizer and config,
        read alone before any weights (a GGUF's metadata, a hub model's tokenizer files:
        :func:`~blueedit.models.loading.tokenizer_source`); where they cannot be read so, the
        module checks after loading, still before statistics and editing."""
        from blueedit.models.loading import context_length, default_cache_dir, tokenizer_source

        cache = model_cfg.get("cache_dir") or _as_dict(model_cfg.get("stats")).get("cache_dir") or default_cache_dir()
        where = tokenizer_source(spec, cache)
        if where is None:
            return
        from transformers import AutoConfig, AutoTokenizer

        directory, kwargs = where
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            config = AutoConfig.from_pretrained(directory, **kwargs)
            context = context_length(config)
        except Exception as e:  # the full load reports real problems with the model directory
            log.debug("prompt lengths are checked after loading: %s", e)
            return
        limit = effective_prompt_limit(model_cfg.get("max_prompt_tokens", 512), context)
        check_prompt_lengths(dm.requests, tokenizer, limit, source="the edit records")
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        layers = _as_dict(model_cfg.get("editing")).get("layers")
        if isinstance(n_layers, int) and layers:
            bad = [l for l in layers if not 0 <= int(l) < n_layers]
            if bad:
                raise UserInputError(f"editing.layers {bad} out of range: the model has blocks 0..{n_layers - 1}")

    def after_instantiate_classes(self) -> None:
        preloaded = getattr(self, "_preloaded", None)
        dm = self.datamodule
        if preloaded is not None and isinstance(dm, EditDataModule):  # already read and validated
            data_cfg, requests = preloaded
            dm.dataset, dm.format, dm.num_edits = data_cfg["dataset"], data_cfg["format"], data_cfg["num_edits"]
            dm._requests = requests


TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "use_distributed_sampler": False,
    "log_every_n_steps": 1,
}

#: Per subcommand, the packaged YAML of its own defaults (LightningCLI's ``default_config_files``):
#: ``fit`` and ``edit`` run no validation loop, ``edit`` writes no Lightning checkpoint unless asked.
SUBCOMMAND_DEFAULTS = {sub: {"default_config_files": [str(Path(__file__).parent / "defaults" / f"{sub}.yaml")]}
                       for sub in ("fit", "edit")}


def subcommand_parser_kwargs(subcommands) -> dict[str, dict[str, Any]]:
    """Each subcommand's parser raises on a bad option (``main`` prints one line) and reads the
    subcommand's defaults file (``defaults/<sub>.yaml``) where there is one."""
    return {sub: {"exit_on_error": False, **SUBCOMMAND_DEFAULTS.get(sub, {})} for sub in subcommands}

#: Exceptions that are the user's to fix: one line and exit status 2, no traceback. A ``ValueError``
#: or ``KeyError`` from inside the engine is not among them: it keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    argparse.ArgumentError, UserInputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
    FileExistsError, PermissionError, CorpusUnavailable,
)


def run_cli(args: list[str] | None = None, run: bool = True) -> BlueEditCLI:
    """Parse ``args`` (default: the command line), run the subcommand, return the CLI object
    (its ``model``, ``datamodule`` and ``trainer``). ``run=False``: ``args`` hold no subcommand;
    the classes are only instantiated (what the config tests use)."""
    quiet_lightning()
    argv = list(sys.argv[1:] if args is None else args)
    from blueedit.vision.cli import is_vision_command  # a config naming a blueedit.vision model: the vision track

    if is_vision_command(argv):
        from blueedit.vision.cli import VisionCLI, run_vision_cli

        return run_vision_cli(args, run=run, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0,
                              parser_kwargs={"prog": "blueedit", "exit_on_error": False,
                                             **subcommand_parser_kwargs(VisionCLI.subcommands())},
                              save_config_kwargs={"overwrite": True})
    return BlueEditCLI(
        EditingModule,
        EditDataModule,
        # a bad option raises (main() prints one line) instead of printing the whole usage
        parser_kwargs={"description": description(BlueEditCLI.subcommands()), "prog": "blueedit",
                       "formatter_class": ShortHelpFormatter, "exit_on_error": False,
                       **subcommand_parser_kwargs(BlueEditCLI.subcommands())},
        auto_configure_optimizers=False,
        trainer_class=EditTrainer,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


_LITERAL_ERROR = re.compile(r'Parser key "(?P<key>[^"]+)":\s*Expected a typing\.Literal\[(?P<choices>.*?)\]\. '
                            r"Got value: (?P<value>.*)", re.S)


def _user_message(e: BaseException) -> str:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    message = " ".join(str(message).split())
    choice = _LITERAL_ERROR.fullmatch(message)
    if choice:  # jsonargparse's wording for a value outside a Literal, in the dataclasses' wording
        return f"{choice['key']} {choice['value']!r} is not one of {choice['choices']}"
    return message or type(e).__name__


def main(args: list[str] | None = None) -> None:
    """The ``blueedit`` console script: exit status 0 on success, 2 for a bad record or option
    (one line on stderr; ``--verbose`` or ``BLUEEDIT_VERBOSE=1`` re-raises with the traceback)."""
    verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    argv = sys.argv if args is None else args
    if "--verbose" in argv:
        verbose = True
        argv[:] = [a for a in argv if a != "--verbose"]
    try:
        rest = list(argv[1:] if args is None else args)
        # plain commands beside the Lightning ones, each with its own parser
        if rest and rest[0] == "revert":
            from blueedit.carry import revert_main
            from blueedit.vision.state import is_edited_vit
            from blueedit.vision.state import revert_main as vision_revert_main

            if any(is_edited_vit(a) for a in rest[1:] if not a.startswith("-")):
                vision_revert_main(rest[1:])
                return

            revert_main(rest[1:])
            return
        if rest and rest[0] == "generate":
            from blueedit.evaluation.side_by_side import generate_main

            generate_main(rest[1:])
            return
        if rest and rest[0] == "locate":
            from blueedit.locate import main as locate_main

            locate_main(rest[1:])
            return
        if rest and rest[0] == "bench":
            from blueedit.bench.__main__ import main as bench_main

            bench_main(rest[1:])
            return
        run_cli(args)
    except USER_ERRORS as e:
        _exit_with_user_error(e, verbose)
    except ValueError as e:  # the parser wraps what a module's __init__ raised while it was instantiated
        cause = _user_error_in_chain(e)
        if cause is None:
            raise
        _exit_with_user_error(cause, verbose, e)


def _user_error_in_chain(error: BaseException) -> BaseException | None:
    """The first of :data:`USER_ERRORS` among ``error``'s causes and contexts, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _exit_with_user_error(error: BaseException, verbose: bool, raised: BaseException | None = None) -> None:
    """Print ``error`` on one line and exit with status 2 (``--verbose``: raise it instead)."""
    if verbose:
        raise raised or error
    print(f"blueedit: error: {_user_message(error)} (--verbose or {VERBOSE_ENV}=1 for the traceback)",
          file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
