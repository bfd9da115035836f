"""``EditingModule``: one editing round per Lightning training step (manual optimization)."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from blueedit import carry, distributed
from blueedit.callbacks._common import log_to_loggers
from blueedit.config import UserInputError, settings_added_later, settings_in_roles
from blueedit.data.datamodule import EditRound, ResumeMismatchError, describe_differences
from blueedit.data.records import EditRequest, check_prompt_lengths, effective_prompt_limit
from blueedit.editing.editor import EditingConfig, Editor, EditorState, RoundReport, check_stream_options
from blueedit.editing.setup import build_editor, cached_key_statistics
from blueedit.editing.statistics import StatsConfig
from blueedit.evaluation.editing_metrics import (
    EvaluationResult,
    add_locality,
    edit_metrics,
    evaluate_requests,
    evaluation_kind,
)
from blueedit.evaluation.generation import (
    GenerationMetricsConfig,
    References,
    generation_records,
    generation_summary,
    load_references,
)
from blueedit.evaluation.metrics import metric_protocol
from blueedit.evaluation.wild import WildConfig, add_wild_locality, wild_records, wild_summary
from blueedit.methods.registry import BUILTIN, get_method
from blueedit.models.adapters import ModelAdapter
from blueedit.models.chat import chat_requests, chat_wrap, has_chat_template
from blueedit.models.loading import (
    ModelConfig,
    context_length,
    default_cache_dir,
    load_model_and_tokenizer,
    model_fingerprint,
)

log = logging.getLogger(__name__)


class EditingModule(L.LightningModule):
    """Sequential locate-then-edit as a Lightning training loop.

    Each training step receives one :class:`~blueedit.data.datamodule.EditRound` and applies it
    with :class:`~blueedit.editing.editor.Editor` (targets at the boundary or last critical layer,
    keys, residuals, closed-form solves, writes). There is no gradient step on the model: the
    only optimizer is a placeholder whose ``step`` advances ``trainer.global_step`` by one per
    round, so checkpoints and loggers count rounds.

    Checkpoints hold only what editing changes: the edited ``W_out`` matrices (``state_dict``)
    and the editor state (history ``H``, projections ``P``, original weights, rounds done,
    context templates, pre-edit metrics), so a resumed run ends with the same weights.

    Args:
        model: which causal LM to edit (:class:`~blueedit.models.loading.ModelConfig`).
        editing: method, strategy (BLUE = ``boundary``), layers and hyperparameters.
        stats: the corpus and size of the key statistics ``C_0``.
        evaluate: evaluate the edited records before and after editing (``metrics.json``).
        eval_batch_size: prompts per forward pass in evaluation.
        generation_metrics: also report fluency (and consistency, when the reference texts are
            available) of top-5 sampled generations from the records' generation prompts, pre and
            post in ``metrics.json`` and in ``validate`` / ``test`` (``docs/algorithms.md`` §8).
            Slow: 100 tokens per generation prompt.
        generation: how the generation metrics are computed (sampling, number of records,
            reference texts); see :class:`~blueedit.evaluation.generation.GenerationMetricsConfig`.
        wild_metrics: also score the model's own greedy answers ("in the wild": ``*_wild``
            metrics beside the teacher-forced ones, :mod:`blueedit.evaluation.wild`), pre and post
            in ``metrics.json``, in ``validate`` / ``test`` and in ``SequenceEvaluation``.
        wild: how the answers are generated (token cap, batch size, chat-template questions,
            number of records); see :class:`~blueedit.evaluation.wild.WildConfig`.
        data_dir: benchmark data directory (linked from ``data.data_dir`` by the CLI).
        cache_dir: cache root for converted models and statistics.
        debug: after every round, check that the edited weights are bit-identical on every rank
            (a checksum all-gather; useful under DDP).
        max_prompt_tokens: the longest text (prompt with its target, paraphrase, neighborhood or
            generation prompt) a record may have, in tokens, checked before any slow work; never
            more than the model's context. ``null``: the model's context only.
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        editing: EditingConfig = EditingConfig(),
        stats: StatsConfig = StatsConfig(),
        evaluate: bool = True,
        eval_batch_size: int = 32,
        generation_metrics: bool = False,
        generation: GenerationMetricsConfig = GenerationMetricsConfig(),
        wild_metrics: bool = False,
        wild: WildConfig = WildConfig(),
        data_dir: str | None = None,
        cache_dir: str | None = None,
        debug: bool = False,
        max_prompt_tokens: int | None = 512,
    ) -> None:
        super().__init__()
        self.model_spec = deepcopy(model or ModelConfig())  # never the shared default instance
        self.hp = deepcopy(editing or EditingConfig())
        #: the method's hooks (:mod:`blueedit.methods.registry`)
        self.method = get_method(self.hp.method)
        self.stats_spec = deepcopy(stats or StatsConfig())
        self.evaluate = evaluate
        self.eval_batch_size = eval_batch_size
        self.generation_metrics = generation_metrics
        self.generation = deepcopy(generation or GenerationMetricsConfig())
        if generation_metrics and self.generation.attribute_snippets is not None:
            if not Path(self.generation.attribute_snippets).expanduser().is_file():
                raise FileNotFoundError(f"generation.attribute_snippets: {self.generation.attribute_snippets} not found")
        self._references: References | None | bool = False  # False: not loaded yet
        self.wild_metrics = wild_metrics
        self.wild = deepcopy(wild or WildConfig())
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir or self.stats_spec.cache_dir or default_cache_dir()).expanduser()
        self.debug = debug
        effective_prompt_limit(max_prompt_tokens, None)  # validates it before the model is loaded
        self.max_prompt_tokens = max_prompt_tokens
        # plain values (not the dataclasses): loggers write them to hparams.yaml, and checkpoints
        # stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters({
            "model": asdict(self.model_spec), "editing": asdict(self.hp), "stats": asdict(self.stats_spec),
            "evaluate": evaluate, "eval_batch_size": eval_batch_size, "generation_metrics": generation_metrics,
            "generation": asdict(self.generation), "wild_metrics": wild_metrics, "wild": asdict(self.wild),
            "data_dir": data_dir, "cache_dir": cache_dir, "debug": debug,
            "max_prompt_tokens": max_prompt_tokens,
        })
        self.automatic_optimization = False
        # the language model, its tokenizer and adapter: loaded by configure_model (Lightning calls it
        # in every stage; the properties below call it on first use outside a trainer)
        self._lm = None
        self._tokenizer = None
        self._adapter: ModelAdapter | None = None
        #: the editor state of an edited model directory this run continues (``blueedit.carry``)
        self.carried: carry.Continuation | None = None
        if carry.has_state(self.model_spec.name_or_path):
            self.carried = carry.load_continuation(self.model_spec.name_or_path, self.settings_fingerprint())
        #: rounds done before this run, in the directory it continues (its round indices start there)
        self.carried_rounds = self.carried.state.rounds_done if self.carried is not None else 0
        #: the statistics cache's directory name and the key of each layer's ``C_0`` (saved with the model)
        self.stats_model_id = (self.carried.meta.get("stats_model_id") if self.carried is not None else None) \
            or model_fingerprint(self.model_spec)
        self.stats_keys: dict[int, str] = {}
        # Editing writes closed-form updates, never an optimizer step; Lightning's manual
        # optimization still needs an optimizer, whose step() advances global_step (one per round),
        # so checkpoints, loggers and callbacks count rounds. This parameter is that optimizer's.
        self._round_counter = torch.nn.Parameter(torch.zeros(()))
        self.editor: Editor | None = None
        self._pending_state: EditorState | None = None
        self._finalized = False  # post-processing (PRUNE) applied; a rescue checkpoint may hold it
        self.reports: list[RoundReport] = []
        self.pre_metrics: dict[str, Any] | None = None
        self.post_metrics: dict[str, Any] | None = None

    # -- the model: loaded in configure_model, not in __init__ ---------------------------------
    def configure_model(self) -> None:
        """Load the language model and tokenizer (``model``) and check the layers against it; once.

        Lightning calls this hook before ``setup`` in ``fit``, ``validate`` and ``test``; :attr:`lm`,
        :attr:`tokenizer` and :attr:`adapter` call it on first use outside a trainer."""
        if self._lm is None:
            lm, tokenizer = load_model_and_tokenizer(self.model_spec, self.cache_dir)
            self._set_lm(lm)
            self._tokenizer = self._tokenizer or tokenizer
            if self.model_spec.chat_template and not has_chat_template(self._tokenizer):
                raise UserInputError(f"model.chat_template is true but the tokenizer of "
                                     f"{self.model_spec.name_or_path!r} has no chat template")
        if self._adapter is None:
            adapter = ModelAdapter(self._lm, **self.model_spec.layout_overrides())
            adapter.check_layers(self.hp.layers)
            self._adapter = adapter

    def _set_lm(self, lm) -> None:
        if self.model_spec.device_map is None:
            self._lm = lm  # a submodule: Lightning moves it to the strategy's device
        else:  # dispatched over several devices by accelerate: keep Lightning from moving it
            object.__setattr__(self, "_lm", lm)
        self._adapter = None

    def _loaded(self, name: str):
        """The attribute ``name``, after :meth:`configure_model` when it is not set yet."""
        if getattr(self, name) is None:
            self.configure_model()
        return getattr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("lm", "tokenizer"):  # through the property's setter, not torch's submodule registry
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    #: the causal language model being edited
    lm = property(lambda self: self._loaded("_lm"), lambda self, lm: self._set_lm(lm))
    #: its tokenizer
    tokenizer = property(lambda self: self._loaded("_tokenizer"),
                         lambda self, tokenizer: setattr(self, "_tokenizer", tokenizer))
    #: where the model keeps its blocks and ``W_out`` (:class:`~blueedit.models.adapters.ModelAdapter`)
    adapter = property(lambda self: self._loaded("_adapter"))

    # -- Lightning plumbing ------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Keep the language model in eval mode whatever is asked.

        Kept on purpose: editing never trains the LM (its forward passes read keys and optimize
        δ), so dropout must stay off even when a callback or the evaluation loop's mode restore
        calls ``train()``; Lightning has no per-submodule setting for this.
        """
        super().train(mode)
        if self._lm is not None:
            self._lm.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.SGD([self._round_counter], lr=0.0)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only the edited ``W_out`` matrices (``[d, d_k]``): the rest of the model is the
        unchanged pretrained checkpoint."""
        return {f"w_out.{l}": self.adapter.get_w_out(l).cpu() for l in self.hp.edited_layers}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected = {f"w_out.{l}" for l in self.hp.edited_layers}
        if strict and set(state_dict) != expected:
            raise UserInputError(f"checkpoint holds {sorted(state_dict)}, expected {sorted(expected)}")
        for key, w in state_dict.items():
            self.adapter.set_w_out(int(key.split(".")[1]), w)

    #: Settings that change speed, not results: they may differ when resuming (field metadata
    #: ``role="speed"``, :func:`blueedit.config.setting`).
    RESUMABLE_SETTINGS = settings_in_roles("speed")
    #: Options added later (PMET's exit, HSE, the target site): left out at their default.
    LATER_OPTIONS = settings_added_later()

    @classmethod
    def _drop_resumable(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` without the :attr:`RESUMABLE_SETTINGS` (in place; returned)."""
        for dotted in cls.RESUMABLE_SETTINGS:
            group, key = dotted.split(".", 1)
            settings.get(group, {}).pop(key, None)
        return settings

    def settings_fingerprint(self) -> dict[str, Any]:
        """The settings that decide the edit: the model, the editing hyperparameters and the
        statistics; saved in checkpoints and compared on resume."""
        def plain(obj: Any) -> Any:
            return json.loads(json.dumps(asdict(obj), default=str))

        settings = {"model": {"name_or_path": self.model_spec.name_or_path, "gguf_file": self.model_spec.gguf_file,
                              "revision": self.model_spec.revision, "dtype": self.model_spec.dtype},
                    "editing": plain(self.hp), "stats": plain(self.stats_spec)}
        if self.model_spec.chat_template:  # only when on: older checkpoints stay resumable
            settings["model"]["chat_template"] = True
        self._drop_resumable(settings)
        # options added later (PMET's exit, HSE) are left out at their defaults, so checkpoints
        # written before they existed still resume
        for dotted, default in self.LATER_OPTIONS.items():
            *path, key = dotted.split(".")
            d = settings
            for p in path:
                d = d.get(p, {})
            if key in d and d[key] == default:
                del d[key]
        # a method's own settings (WISE's) decide nothing for the other methods (and did not exist
        # before that method)
        for name in BUILTIN:
            field_name = get_method(name).config_field
            if field_name is not None and field_name != self.method.config_field:
                settings["editing"].pop(field_name, None)
        return settings

    def _check_resume_settings(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            warnings.warn("the checkpoint records no settings (written by an older blueedit); resuming unchecked",
                          stacklevel=2)
            return
        saved = self._drop_resumable(copy.deepcopy(saved))  # checkpoints written while they were recorded
        differences = describe_differences(saved, self.settings_fingerprint())
        if differences:
            where = f" {self._trainer.ckpt_path}" if self._trainer is not None and self._trainer.ckpt_path else ""
            raise ResumeMismatchError(f"the checkpoint{where} was written with other settings; refusing to resume: "
                                      + "; ".join(differences))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["blueedit"] = {
            "settings": self.settings_fingerprint(),
            "editor": self.editor.state.to_dict() if self.editor else None,
            "pre_metrics": self.pre_metrics,
            "reports": [r.__dict__ for r in self.reports],
            "finalized": self._finalized,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("blueedit", {})
        self._check_resume_settings(saved.get("settings"))
        if saved.get("editor"):
            self._pending_state = self.method.load_state(saved["editor"])
            if self.editor is not None:
                self.editor.load_state(self.method.load_state(saved["editor"], self.editor.device))
        self.pre_metrics = saved.get("pre_metrics")
        self.reports = [RoundReport(**r) for r in saved.get("reports", [])]
        self._finalized = bool(saved.get("finalized", False))

    # -- setup: statistics, templates, editor -------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.editor is not None:
            return
        self.check_prompt_lengths()
        total_rounds = self.check_stream_options()
        if self.model_spec.device_map is None and self.trainer is not None:
            self.lm.to(self.trainer.strategy.root_device)
        own = self.method.create_editor(self)  # a method with an editor of its own (WISE)
        if own is not None:
            self.editor = own
            if self._pending_state is not None:
                self.editor.load_state(self.method.load_state(self._pending_state.to_dict(), self.editor.device))
            return
        # Lightning restores a checkpoint's (edited) weights after this hook: C_0, its cache key and
        # the context templates are computed on the pretrained weights
        progress = self._progress_label("setup") is not None
        state, templates, original = self._pending_state, None, {}
        if self.carried is not None:  # continuing an edited model directory: its base weights, history, templates
            original = carry.prepare_continuation(self.carried, self.lm, self.tokenizer, self.adapter,
                                                  self.model_spec.name_or_path)
            state, templates = state or self.carried.state, self.carried.state.context_templates
        keys: dict[int, str] = {}
        with carry.base_weights(self.adapter, original):  # C_0 of the base weights, never of edited ones
            mom2 = cached_key_statistics(self.lm, self.tokenizer, self.hp.edited_layers, self.stats_spec,
                                         model_id=self.stats_model_id, adapter=self.adapter, data_dir=self.data_dir,
                                         cache_dir=self.cache_dir, single_pass=self.hp.optimize, progress=progress,
                                         cache_keys=keys)
        saved_keys = {int(l): k for l, k in self.carried.meta.get("stats_keys", {}).items()} if self.carried else {}
        if saved_keys and saved_keys != keys:
            raise carry.CarryError(f"{self.model_spec.name_or_path} was edited with other key statistics C_0 (cache "
                                   f"keys {saved_keys}, now {keys}): check stats.* and the data directory")
        self.stats_keys = keys
        self.editor = build_editor(self.lm, self.tokenizer, self.hp, self.stats_spec, adapter=self.adapter,
                                   mom2=mom2, context_templates=templates, state=state, progress=progress)
        if total_rounds is not None:
            self.editor.set_total_rounds(total_rounds)

    def check_stream_options(self) -> int | None:
        """The stream's number of rounds (HSE's ``n``), after checking HSE's options against the
        edit records (``target_true`` for forgetting, ``n`` for the ``inverse`` schedule) before
        any slow work."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        requests = dm.requests if dm is not None and hasattr(dm, "requests") else []
        total = dm.num_rounds if dm is not None and hasattr(dm, "num_rounds") else None
        check_stream_options(self.hp, requests, total)
        return total

    @property
    def prompt_limit(self) -> int | None:
        """``max_prompt_tokens`` capped by the model's context length."""
        return effective_prompt_limit(self.max_prompt_tokens, context_length(self.lm.config))

    def check_prompt_lengths(self) -> None:
        """Fail, naming the record, when a text of the data module's records is over
        :attr:`prompt_limit` (before statistics and editing)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "requests"):
            return
        check_prompt_lengths(self.as_prompted(dm.requests), self.tokenizer, self.prompt_limit,
                             source="the edit records")
        if self.evaluate and getattr(dm, "eval_dataset", None) is not None:
            check_prompt_lengths(self.as_prompted(dm.eval_requests()), self.tokenizer, self.prompt_limit,
                                 source="the evaluation records")

    def as_prompted(self, requests: list[EditRequest]) -> list[EditRequest]:
        """``requests`` as the model is prompted with them: in the chat template with
        ``model.chat_template``, else unchanged."""
        if not self.model_spec.chat_template:
            return list(requests)
        return chat_requests(self.tokenizer, list(requests))

    # -- the editing loop ---------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Continuing an edited model directory, this run's rounds are numbered after its rounds
        (callbacks and checkpoints see one run)."""
        if self.carried_rounds and isinstance(batch, EditRound) and self.trainer.training:
            batch = replace(batch, index=batch.index + self.carried_rounds)
        return batch

    def on_train_start(self) -> None:
        if self.evaluate and self.pre_metrics is None:
            self.pre_metrics = self.run_evaluation(progress=self._progress_label("evaluation before editing")).to_dict()

    def training_step(self, batch: EditRound, batch_idx: int) -> None:
        assert self.editor is not None
        if batch.index < self.editor.state.rounds_done:  # already applied before a resume
            return None
        report = self.editor.edit_round(self.as_prompted(batch.requests), batch.index)
        self.reports.append(report)
        if self.debug:  # every rank must hold bit-identical weights after every round
            digest = distributed.assert_same_on_all_ranks(
                [self.adapter.get_w_out(l) for l in self.hp.edited_layers], f"weights after round {batch.index}"
            )
            log.info("round %d: edited weights checksum %s on every rank", batch.index, digest)
        self.optimizers().step()  # advances global_step: one step per round
        logs = {"edit/seconds": report.seconds, "edit/edits_done": float(sum(len(r.case_ids) for r in self.reports))}
        for l, n in report.update_norms.items():
            logs[f"edit/update_norm/layer{l}"] = n
        self.log_dict(logs, batch_size=len(batch.requests), on_step=True, on_epoch=False)
        final_losses = [v for losses in report.target_loss.values() for v in losses]  # per layer and request
        bar = {"edits": logs["edit/edits_done"]}
        if final_losses:
            bar["z_loss"] = sum(final_losses) / len(final_losses)
        self.log_dict(bar, batch_size=len(batch.requests), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return None

    def on_train_end(self) -> None:
        assert self.editor is not None
        if not self._finalized:
            self.editor.finalize()
            self._finalized = True
        if self.evaluate:
            post = self.run_evaluation(progress=self._progress_label("evaluation after editing"))
            add_locality(post, self.pre_metrics)
            if self.wild_metrics:
                add_wild_locality(post.records, (self.pre_metrics or {}).get("records"))
                post.metrics.update(wild_summary(post.records))
            self.post_metrics = post.to_dict()
            self.write_metrics()

    # -- evaluation ---------------------------------------------------------------------------
    def eval_requests(self) -> list[EditRequest]:
        dm = self.trainer.datamodule if self.trainer is not None else None
        return dm.eval_requests() if dm is not None else []

    def _progress_label(self, label: str) -> str | None:
        """``label`` when this process shows progress bars (rank zero, the trainer's bar on)."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return None
        return label

    @torch.no_grad()
    def run_evaluation(self, requests: list[EditRequest] | None = None, progress: str | None = None) -> EvaluationResult:
        """Evaluate ``requests`` (default: the data module's evaluation records) on the model as
        it is now. Under DDP each rank scores its shard; the metrics are synchronized through
        torchmetrics and the per-record results gathered, so every rank returns the same result.
        With ``generation_metrics`` each record also gets its generations, ``fluency`` and
        (with reference texts) ``consistency``, and the metrics their means over records.
        ``progress``: a progress bar over the scored prompts with this description."""
        requests = self.as_prompted(self.eval_requests() if requests is None else requests)
        _, world = distributed.rank_and_world()
        with self.editor.evaluation_weights() if self.editor is not None else nullcontext():
            if world == 1 or len(requests) < world:
                res = evaluate_requests(self.lm, self.tokenizer, requests, batch_size=self.eval_batch_size,
                                        progress=progress)
                self._add_generation(res, requests)
                self._add_wild(res, requests, progress)
                return res
            local = distributed.shard(requests)
            res = evaluate_requests(self.lm, self.tokenizer, local, batch_size=self.eval_batch_size, sync=True,
                                    progress=progress)
            self._add_generation(res, local)
            self._add_wild(res, local, progress, summarize=False)
        res.records = distributed.gather_objects(res.records, len(requests))
        res.num_records = len(requests)
        if self.generation_metrics:
            res.metrics.update(generation_summary(res.records))
        if self.wild_metrics:
            res.metrics.update(wild_summary(res.records))
        return res

    def _add_wild(self, res: EvaluationResult, requests: list[EditRequest], progress: str | None = None,
                  summarize: bool = True) -> None:
        """Merge the in-the-wild answers and scores of ``requests`` (as prompted) into ``res``'s
        records (by position) and, with ``summarize``, their means into its metrics."""
        if not self.wild_metrics:
            return
        ask = None
        if self.wild.chat_template and not self.model_spec.chat_template:
            if not has_chat_template(self.tokenizer):
                raise ValueError(f"wild.chat_template is true but the tokenizer of {self.model_spec.name_or_path!r} "
                                 "has no chat template")
            ask = lambda prompt: chat_wrap(self.tokenizer, prompt)  # noqa: E731
        label = None if progress is None else f"{progress} (in the wild)"
        answers = wild_records(self.lm, self.tokenizer, requests, self.wild, ask=ask, progress=label)
        for rec, wild in zip(res.records, answers):
            rec.update({k: v for k, v in wild.items() if k != "case_id"})
        if summarize:
            res.metrics.update(wild_summary(res.records))

    def references(self) -> References | None:
        """The consistency reference texts, loaded once (``None`` when not available)."""
        if self._references is False:
            data_dir = self.data_dir
            if data_dir is None and self._trainer is not None:
                dm = getattr(self.trainer, "datamodule", None)
                data_dir = getattr(dm, "resolved_data_dir", None) if dm is not None else None
            self._references = load_references(self.generation, data_dir)
        return self._references  # type: ignore[return-value]

    def _generation_records(self, requests: list[EditRequest], prompt_offset: int = 0) -> list[dict[str, Any]]:
        spec = self.generation if prompt_offset == 0 else replace(self.generation, num_records=None)
        return generation_records(self.lm, self.tokenizer, requests, spec, self.references(), prompt_offset)

    def _add_generation(self, res: EvaluationResult, requests: list[EditRequest]) -> None:
        """Merge the generation metrics of ``requests`` into ``res`` (its records and metrics)."""
        if not self.generation_metrics:
            return
        by_position = self._generation_records(requests)
        for rec, gen in zip(res.records, by_position):
            rec.update({k: v for k, v in gen.items() if k != "case_id"})
        res.metrics.update(generation_summary(by_position))

    def write_metrics(self) -> Path | None:
        """``metrics.json`` (pre/post per metric, per-record results) in the run's log directory,
        and a table on stdout."""
        if self.trainer is None:
            return None
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP
        return self._write_metrics(out_dir)

    @rank_zero_only
    def _write_metrics(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        pre, post = self.pre_metrics or {}, self.post_metrics or {}
        names = list((post.get("metrics") or pre.get("metrics") or {}).keys())
        summary = {
            "method": self.hp.method,
            "strategy": self.hp.strategy,
            "layers": self.hp.edited_layers,
            "num_edits": sum(len(r.case_ids) for r in self.reports),
            "rounds": len(self.reports),
            "edit_seconds": sum(r.seconds for r in self.reports),
            "kind": post.get("kind") or pre.get("kind"),
            "metrics": {n: {"pre": (pre.get("metrics") or {}).get(n), "post": (post.get("metrics") or {}).get(n),
                            "protocol": metric_protocol(n)} for n in names},
            "records": {"pre": pre.get("records"), "post": post.get("records")},
        }
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(summary, indent=1, default=str))
        log_to_loggers(self.trainer, {f"{when}/{n}": v[when] for n, v in summary["metrics"].items()
                                      for when in ("pre", "post") if v[when] is not None})
        # plain print (this method runs on rank zero only): after fit the progress bars are closed,
        # and LightningModule.print through a closed TQDM bar prints nothing
        print(metrics_table(summary))
        print(f"metrics written to {path}")
        from blueedit.evaluation.reports import write_report

        try:
            write_report(out_dir, summary, self.trainer.callbacks)
        except Exception as e:  # the report is a convenience; metrics.json is already written
            log.warning("writing the run report failed: %s", e)
        return path

    # -- validate / test: evaluate the loaded (e.g. saved, edited) model ------------------------
    def _eval_meters(self, stage: str) -> None:
        """Fresh accumulators for ``stage`` (``val``/``test``) at each epoch start; the metric
        collection itself is made at the first batch, when the records' kind is known."""
        setattr(self, f"_{stage}_meters", None)
        self._eval_state = {"kind": None, "num_records": 0, "records": [], "generation": []}

    def _eval_step(self, batch: EditRound, stage: str) -> None:
        requests = self.as_prompted(batch.requests)
        if not requests:
            return
        if getattr(self, "_eval_state", None) is None:
            self._eval_meters(stage)
        kind = evaluation_kind(requests)
        meters = getattr(self, f"_{stage}_meters", None)
        if meters is None:  # one mean per metric over every record of the epoch (docs/algorithms.md §8)
            meters = edit_metrics(kind)
            setattr(self, f"_{stage}_meters", meters)
        res = evaluate_requests(self.lm, self.tokenizer, requests, kind=kind, batch_size=self.eval_batch_size,
                                metrics=meters)
        self._add_wild(res, requests, summarize=False)
        st = self._eval_state
        st["kind"] = res.kind
        st["num_records"] += res.num_records
        st["records"].extend(res.records)
        if self.generation_metrics:  # the first ``generation.num_records`` records of the epoch
            done = st["generation"]
            limit = self.generation.num_records
            chosen = requests if limit is None else requests[: max(0, limit - len(done))]
            offset = sum(len(g["generations"]) for g in done)  # prompt index of the epoch: the seed stream
            st["generation"].extend(self._generation_records(chosen, offset))

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        meters = getattr(self, f"_{stage}_meters", None)
        st = getattr(self, "_eval_state", None) or {"kind": None, "num_records": 0, "records": [], "generation": []}
        metrics: dict[str, float] = meters.results() if meters is not None else {}
        if self.generation_metrics:
            metrics.update(generation_summary(st.get("generation") or []))
        if self.wild_metrics:
            metrics.update(wild_summary(st.get("records") or []))
        self._eval_state = None
        setattr(self, f"_{stage}_meters", None)
        if self._trainer is None:  # called directly (no trainer): just the numbers
            return metrics
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, sync_dist=False)
        self._write_eval_metrics(Path(self.trainer.log_dir or self.trainer.default_root_dir), stage, st, metrics)
        return metrics

    @rank_zero_only
    def _write_eval_metrics(self, out_dir: Path, stage: str, st: dict, metrics: dict[str, float]) -> None:
        """``eval_metrics.json`` of ``validate`` / ``test`` (metrics and per-record results)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        records = st["records"]
        if self.generation_metrics:  # generations of the first records, beside their scores
            gens = st["generation"]
            records = [{**r, **{k: v for k, v in gens[i].items() if k != "case_id"}} if i < len(gens) else r
                       for i, r in enumerate(records)]
        payload = {"stage": stage, "model": self.model_spec.name_or_path, "kind": st["kind"],
                   "num_records": st["num_records"], "metrics": metrics,
                   "protocols": {name: metric_protocol(name) for name in metrics}, "records": records}
        path = out_dir / "eval_metrics.json"
        path.write_text(json.dumps(payload, indent=1, default=str))
        self.print(f"{stage} metrics written to {path}: "
                   + ", ".join(f"{k} ({metric_protocol(k)}) {v:.2f}" for k, v in metrics.items()))

    def on_validation_epoch_start(self) -> None:
        self._eval_meters("val")

    def validation_step(self, batch: EditRound, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_meters("test")

    def test_step(self, batch: EditRound, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def metrics_table(summary: dict) -> str:
    """A Markdown table of pre/post metrics."""
    lines = [
        f"{summary['method']} ({summary['strategy']}), {summary['num_edits']} edits in {summary['rounds']} rounds, "
        f"{summary['edit_seconds']:.1f} s editing",
        "",
        "| metric | protocol | pre | post |",
        "|---|---|---:|---:|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name, v in summary["metrics"].items():
        lines.append(f"| {name} | {metric_protocol(name)} | {fmt(v['pre'])} | {fmt(v['post'])} |")
    return "\n".join(lines)
