"""Side by side with the published BLUE implementation (github.com/xpq-tech/BLUE).

Runs the published algorithms, each without and with BLUE, and blueedit's counterparts on the same
model, the same ``C_0``, the same edit records, rounds, hyperparameters and context templates, then
scores every final model with blueedit's own evaluator, so both sides' metrics are computed
identically. The pairs (``--methods``; default the first four, ``all`` for every one), each by its
name in the published ``experiments/evaluate.py`` ``ALG_DICT`` and blueedit's method (``distribute``
without BLUE, ``boundary`` with it):

    memit, memit_blue          MEMIT_seq    memit         alphaedit, alphaedit_blue  AlphaEdit    alphaedit
    pmet, pmet_blue            PMET_seq     pmet          rect, rect_blue            MEMIT_rect   rect
    prune, prune_blue          MEMIT_prune  prune

    python -m blueedit.bench.vs_published --published ../published-BLUE
    python -m blueedit.bench.vs_published --published ../published-BLUE --methods memit,memit_blue \\
        --num-edits 100 --edits-per-round 25 --threads 1

``--published`` is a checkout of the published repository that the user provides. It is never part
of this repository and nothing in it is edited: the harness puts it on ``sys.path``, imports it, and
adapts it at run time only for the duration of each published run:

- ``C_0``: computed once with blueedit's statistics (``--stats-samples`` texts of
  ``--stats-corpus``) and handed to the published code by replacing the ``get_cov`` function of
  each entry point's module.
- Context templates: blueedit's templates are put into each entry point's context-template cache,
  so both sides optimize over the same prompts.
- Hyperparameters: the published hyperparameter objects are built here (no JSON file), with the
  model's module layout; the published BLUE configurations edit only the first and last layer of
  ``--layers``, so the published BLUE runs get ``layers = [l_1, l_m]``.
- The sequential-editing state the published driver script keeps (the edit history ``cache_c`` and,
  for AlphaEdit, the null-space projections ``P``, built as that script does: eigenvectors of the
  singular-value decomposition of ``C_0`` below ``--nullspace-threshold``) is created here.
- Transformer blocks that return a tensor (recent transformers) are presented to the published
  tracing code as the 1-tuples it expects.
- The published code places tensors on ``"cuda"``; without a GPU (``--device cpu``) those
  placements are redirected to the CPU.
- Its console output is sent to ``--published-log`` (default: discarded).

The other pairs, and what each side is given (the published driver is ``experiments/evaluate.py``):

- PMET (``pmet/pmet_seq_main.py``, ``apply_pmet_seq_to_model`` with ``cache_c``, a
  ``PMETHyperParams``; the published configurations are ``hparams/PMET/*.json``). Its two target
  sites, where ``compute_zs`` adds δ_mlp and δ_attn at the fact token, are ``mlp_module_tmp`` =
  the output of ``W_out`` (``model.layers.{}.mlp.down_proj``, as every published PMET configuration)
  and ``attn_module_tmp`` = the attention output projection (``model.layers.{}.self_attn.o_proj``):
  the modules blueedit's PMET uses. ``rewrite_module_tmps`` is ``W_out`` alone, as in the published
  configurations (blueedit writes only ``W_out``; the published code's edit history ``cache_c`` has
  one ``d_k`` per layer, so it cannot write a second module of another input size either). Without
  BLUE the targets are optimized at ``l_m`` once and the residual (at ``W_out``'s output of ``l_m``)
  divided by ``sqrt(m − i)``; with BLUE, at each of its two layers ``l_1`` and ``l_m`` (undivided).
  The published ``compute_zs`` hard-codes its top-1 exit (NLL weight ``0.1 · nll_loss_factor`` once
  o* is top-1 everywhere, stop when the KL term is below 0.01): blueedit's side gets
  ``target.top1_nll_factor: 0.1`` and ``target.top1_kl_stop: 0.01`` (as ``configs/*/pmet.yaml``);
  ``nll_loss_factor`` is 1 (blueedit has no NLL weight besides that exit).
- RECT (``memit/memit_rect_main.py``, ``apply_memit_rect_to_model``, a ``MEMITHyperParams``, the
  MEMIT configurations): the driver gives it no edit history, so blueedit's side gets
  ``use_history: false``. It keeps ``k_percent = 40`` % of each update's entries (hard-coded), by the
  score ``|ΔW / (W + 1e-8)|`` (blueedit: ``|ΔW| / (|W| + 1e-8)``, the same unless ``W`` is within
  1e-8 of 0), counting them as ``numel − int(0.6 · numel) + 1``, one or two more than blueedit's
  ``round(0.4 · numel)``: blueedit's ``rect_keep`` is set to that count (:func:`published_rect_keep`;
  with 0.4 itself, the one or two entries fewer, the lowest-ranked of those kept, change the sparse
  ``ΔW`` by about ``sqrt(2 / kept)`` of its norm: 3 to 6 % on the tiny test model, about 0.2 % expected on SmolLM2, 2 of 353 896).
- PRUNE (``MEMIT_prune``: ``memit/memit_main.py``'s ``apply_memit_to_model``, a ``MEMITHyperParams``,
  the MEMIT configurations; the restraint is in the driver itself and is done here as it does it:
  :func:`published_prune_restraint`): no edit history (``use_history: false``); after round
  ``num_edits / edits_per_round − 1`` the driver restrains the accumulated edit ``Δ = W − W_0`` and
  adds it to the *edited* weights, ``W + restrain(Δ)``: blueedit's side gets ``prune_base: current``
  (its default, ``original``, is the PRUNE paper's ``W_0 + restrain(Δ)``). That driver test never
  holds when ``--num-edits`` is not a multiple of ``--edits-per-round``, so such runs are refused.
  PRUNE has no other setting on either side (σ is the largest singular value of ``W_0``, the
  restraint ``log s − log σ + σ`` for every ``s > σ``).

The blueedit settings named above (``use_history``, ``rect_keep``, ``prune_base``,
``target.top1_*``) are set for their pairs whatever ``--editing.*`` says; every other setting comes
from the command line on both sides, as for the first four pairs. Settings only blueedit has are
left to the command line, and their defaults are the published behaviour (``target.early_stop_loss``
0.05 is the published exit at a loss below 5e-2; ``anchor_position0``, ``stop_after``, ``site`` and
HSE's options are off). Settings only the published code has are fixed: ``fact_token:
subject_last``, ``mom2_adjustment``, ``layer_selection: all``, and MEMIT_prune's ``edit_layer`` -1
(every layer).

Editing seconds are the wall time of the editing rounds only (not ``C_0``, the AlphaEdit
projections, or the evaluation). Results go to ``<out>.json`` and ``<out>.md``; ``--merge`` combines
the JSON files of partial runs (e.g. the two sides run as separate processes) into one table.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from blueedit.bench import harness as C

METRICS = ("efficacy", "generalization", "specificity")
SIDES = ("published", "blueedit")


@dataclass(frozen=True)
class Pair:
    """One comparison: the published algorithm and blueedit's counterpart."""

    name: str
    published: str  # the published algorithm's name in its experiments/evaluate.py ALG_DICT (+ " + BLUE")
    blue: bool  # the published hyperparameter "blue"
    method: str  # blueedit editing.method
    strategy: str  # blueedit editing.strategy
    #: blueedit ``EditingConfig`` / ``TargetConfig`` fields set for this pair to what the published
    #: code hard-codes (whatever the command line says): (field, value) pairs
    editing: tuple[tuple[str, object], ...] = ()
    target: tuple[tuple[str, object], ...] = ()

    @property
    def alg(self) -> str:
        """The published ``ALG_DICT`` key (``MEMIT_seq``, ``AlphaEdit``, ``PMET_seq``, ``MEMIT_rect``, ``MEMIT_prune``)."""
        return self.published.split(" + ")[0]


# What the published code hard-codes, as blueedit settings (module docstring, "The other pairs").
#: MEMIT_rect and MEMIT_prune: evaluate.py gives them no edit history (no ``cache_c``), so the solve is
#: ``λ C_0 + K Kᵀ`` (blueedit ``use_history: false``, its plain-MEMIT solve).
_NO_HISTORY = (("use_history", False),)
#: memit_rect_main.py keeps ``k_percent = 40`` % of the entries, counted as it counts them: blueedit's
#: ``rect_keep`` is set per model by :func:`published_rect_keep` (in :func:`run_blueedit`).
RECT_PERCENT = 40
_RECT = _NO_HISTORY
#: evaluate.py adds the restrained edit to the edited weights, ``W + restrain(W − W_0)`` (blueedit
#: ``prune_base: current``; blueedit's default ``original`` is the PRUNE paper's ``W_0 + restrain(W − W_0)``).
_PRUNE = _NO_HISTORY + (("prune_base", "current"),)
#: pmet/compute_zs.py: once o* is the top-1 token everywhere the next NLL weight is ``0.1 ·
#: nll_loss_factor`` (``nll_loss_factor`` 1) and the request stops when its KL term is below 0.01.
_PMET_TARGET = (("top1_nll_factor", 0.1), ("top1_kl_stop", 0.01))

PAIRS: dict[str, Pair] = {
    "memit": Pair("memit", "MEMIT_seq", False, "memit", "distribute"),
    "memit_blue": Pair("memit_blue", "MEMIT_seq + BLUE", True, "memit", "boundary"),
    "alphaedit": Pair("alphaedit", "AlphaEdit", False, "alphaedit", "distribute"),
    "alphaedit_blue": Pair("alphaedit_blue", "AlphaEdit + BLUE", True, "alphaedit", "boundary"),
    "pmet": Pair("pmet", "PMET_seq", False, "pmet", "distribute", target=_PMET_TARGET),
    "pmet_blue": Pair("pmet_blue", "PMET_seq + BLUE", True, "pmet", "boundary", target=_PMET_TARGET),
    "rect": Pair("rect", "MEMIT_rect", False, "rect", "distribute", editing=_RECT),
    "rect_blue": Pair("rect_blue", "MEMIT_rect + BLUE", True, "rect", "boundary", editing=_RECT),
    "prune": Pair("prune", "MEMIT_prune", False, "prune", "distribute", editing=_PRUNE),
    "prune_blue": Pair("prune_blue", "MEMIT_prune + BLUE", True, "prune", "boundary", editing=_PRUNE),
}
#: ``--methods`` by default: the first four pairs (as before the others were added); ``all`` runs every pair.
DEFAULT_METHODS = ("memit", "memit_blue", "alphaedit", "alphaedit_blue")

#: Files the published checkout must have (checked before any slow work).
PUBLISHED_FILES = ("memit/memit_seq_main.py", "memit/memit_hparams.py", "AlphaEdit/AlphaEdit_main.py",
                   "AlphaEdit/AlphaEdit_hparams.py", "util/nethook.py", "globals.yml", "memit/memit_main.py",
                   "memit/memit_rect_main.py", "pmet/pmet_seq_main.py", "pmet/pmet_hparams.py")


SHORTHANDS = C.shorthands(
    "--layers", "--lam", "--v-lr", "--steps", "--loss-layer", "--kl-factor", "--weight-decay", "--clamp",
    "--L2", "--nullspace-threshold", "--stats-samples", "--stats-max-length", "--stats-corpus")


def build_parser():
    p = C.benchmark_parser(__doc__, shorthands=SHORTHANDS, editing_defaults=alphaedit_defaults(),
                           stats_defaults={"corpus": "wikipedia-sample", "num_samples": 300, "max_length": 256})
    p.add_argument("--published", default=None, metavar="PATH",
                   help="checkout of github.com/xpq-tech/BLUE (required unless --sides blueedit or --merge)")
    p.add_argument("--num-edits", type=int, default=100, help="first N records of --dataset")
    p.add_argument("--edits-per-round", type=int, default=25)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(PAIRS)}, or all")
    p.add_argument("--sides", default=",".join(SIDES), help="published, blueedit or both")
    C.add_model_options(p)
    p.add_argument("--dataset", default="counterfact_eval")
    p.add_argument("--published-log", default=None, help="file for the published code's console output")
    p.add_argument("--no-pre-edit", action="store_true", help="skip the evaluation of the unedited model")
    p.add_argument("--eval-every-round", action="store_true",
                   help="also evaluate the records edited so far after every round (the table then compares "
                        "runs that did not finish at the last round both sides reached)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine these result files (from earlier runs) into one table; runs nothing")
    p.add_argument("--out", default=str(C.RESULTS / "vs_published"),
                   help="writes <out>.json and <out>.md ('' to skip)")
    return p


def alphaedit_defaults() -> dict:
    """``L2`` and ``nullspace_threshold`` of ``configs/smollm2-135m/alphaedit.yaml``."""
    import yaml

    cfg = yaml.safe_load((C.REPO / "configs" / "smollm2-135m" / "alphaedit.yaml").read_text())
    ed = cfg["model"]["editing"]
    return {"L2": float(ed["L2"]), "nullspace_threshold": float(ed["nullspace_threshold"])}


def published_rect_keep(numel: int, percent: int = RECT_PERCENT) -> float:
    """blueedit's ``rect_keep`` for the number of entries the published RECT keeps of a ``numel``-entry
    ``W_out``: its threshold is the ``k``-th smallest score, ``k = int(numel · (100 − percent) / 100)``,
    and it keeps every score ``≥`` that, ``numel − k + 1`` entries (one or two more than ``percent`` %:
    819 of 2048 would be 40 %, it keeps 821), where blueedit keeps ``round(rect_keep · numel)``."""
    kept = numel - int(numel * (100 - percent) / 100) + 1
    return kept / numel


def check_args(parser, args) -> tuple[list[Pair], list[str]]:
    """The pairs and sides asked for; a clear error (before any slow work) for bad options."""
    names = list(PAIRS) if args.methods.strip() == "all" else C.parse_str_list(args.methods)
    bad = [n for n in names if n not in PAIRS]
    if bad or not names:
        parser.error(f"--methods {args.methods!r}: choose from {','.join(PAIRS)} (or all)")
    sides = C.parse_str_list(args.sides)
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides {args.sides!r}: choose from {','.join(SIDES)}")
    if "published" in sides:
        if not args.published:
            parser.error("--published PATH is required: a checkout of github.com/xpq-tech/BLUE "
                         "(or run only blueedit's side with --sides blueedit)")
        root = Path(args.published).expanduser()
        missing = [f for f in PUBLISHED_FILES if not (root / f).is_file()]
        if missing:
            parser.error(f"--published {args.published}: not a checkout of github.com/xpq-tech/BLUE "
                         f"(missing {', '.join(missing)})")
    if args.num_edits < 1 or args.edits_per_round < 1:
        parser.error("--num-edits and --edits-per-round must be >= 1")
    if any(PAIRS[n].method == "prune" for n in names) and args.num_edits % args.edits_per_round:
        parser.error(f"--num-edits {args.num_edits} is not a multiple of --edits-per-round {args.edits_per_round}: "
                     "the published driver (experiments/evaluate.py) applies PRUNE's restraint after round "
                     "num_edits / edits_per_round only, i.e. never for these sizes (blueedit would, after its last)")
    layers = args.base.layers
    if len(layers) < 2:
        parser.error(f"--layers {layers}: BLUE needs at least two consecutive increasing layers")
    return [PAIRS[n] for n in names], sides


# -- the published code, adapted at run time -----------------------------------------------------
class Published:
    """The published modules, imported from a checkout without changing it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        cwd = os.getcwd()
        os.chdir(self.root)  # its util/globals.py reads "globals.yml" from the working directory
        try:
            self.nethook = importlib.import_module("util.nethook")
            self.memit_seq = importlib.import_module("memit.memit_seq_main")
            self.MEMITHyperParams = importlib.import_module("memit.memit_hparams").MEMITHyperParams
            self.alphaedit = importlib.import_module("AlphaEdit.AlphaEdit_main")
            self.AlphaEditHyperParams = importlib.import_module("AlphaEdit.AlphaEdit_hparams").AlphaEditHyperParams
            self.memit = importlib.import_module("memit.memit_main")  # MEMIT_prune's apply_memit_to_model
            self.memit_rect = importlib.import_module("memit.memit_rect_main")
            self.pmet_seq = importlib.import_module("pmet.pmet_seq_main")
            self.PMETHyperParams = importlib.import_module("pmet.pmet_hparams").PMETHyperParams
        finally:
            os.chdir(cwd)
        #: the modules of the algorithms' entry points (each has its own get_cov and context-template cache)
        self.entry_modules = (self.memit_seq, self.alphaedit, self.memit, self.memit_rect, self.pmet_seq)
        # every published module that names ``torch`` (for the device redirection)
        prefixes = ("memit.", "AlphaEdit.", "rome.", "util.", "pmet.")
        self.modules = [m for n, m in list(sys.modules.items())
                        if m is not None and n.startswith(prefixes) and getattr(m, "__file__", None)
                        and str(self.root) in str(m.__file__) and getattr(m, "torch", None) is torch]

    def hparams(self, pair: Pair, layout: dict, layers: list[int], args, loss_layer: int):
        """The published hyperparameter object for ``pair`` (BLUE: only the boundary layers).

        Every pair: ``layers``, ``v_num_grad_steps``, ``v_lr``, ``v_loss_layer``, ``v_weight_decay``,
        ``clamp_norm_factor``, ``kl_factor`` and ``mom2_update_weight`` (λ) are blueedit's (``--editing.*``);
        ``fact_token: subject_last`` and ``mom2_adjustment`` are what blueedit always does; ``mom2_*`` only
        name the statistics (the ``C_0`` tensor itself is blueedit's, see :func:`adapted`). AlphaEdit adds
        ``nullspace_threshold`` and ``L2``; PMET adds ``rewrite_module_tmps`` (only ``W_out``, as the
        published PMET configurations), its two target sites in ``layout`` (:func:`module_layout`) and
        ``nll_loss_factor`` 1 (blueedit's NLL weight). MEMIT_rect and MEMIT_prune take MEMIT's."""
        base, target, stats = args.base, args.base.target, args.stats_config
        kw = dict(model_name=args.model, layers=[layers[0], layers[-1]] if pair.blue else list(layers),
                  layer_selection="all", fact_token="subject_last", v_num_grad_steps=target.v_num_grad_steps,
                  v_lr=target.v_lr, v_loss_layer=loss_layer, v_weight_decay=target.v_weight_decay,
                  clamp_norm_factor=target.clamp_norm_factor, kl_factor=target.kl_factor, mom2_adjustment=True,
                  mom2_update_weight=base.mom2_update_weight, mom2_dataset=stats.corpus,
                  mom2_n_samples=stats.num_samples, mom2_dtype="float32", blue=pair.blue, **layout)
        if pair.method == "alphaedit":
            return self.AlphaEditHyperParams(nullspace_threshold=base.nullspace_threshold, L2=base.L2, **kw)
        if pair.method == "pmet":
            return self.PMETHyperParams(rewrite_module_tmps=[layout["rewrite_module_tmp"]], nll_loss_factor=1.0, **kw)
        return self.MEMITHyperParams(**kw)


def module_layout(adapter, pmet: bool = False) -> dict[str, str]:
    """The published module-name templates, from blueedit's detected layout.

    ``pmet``: PMET's two target sites, where its ``compute_zs`` adds δ_mlp and δ_attn, are
    ``mlp_module_tmp``, the output of ``W_out`` itself (as in every published PMET configuration,
    e.g. ``model.layers.{}.mlp.down_proj``), and ``attn_module_tmp``, the attention output
    projection (``model.layers.{}.self_attn.o_proj``): the modules blueedit's PMET adds its two δ
    to (``ModelAdapter.w_out_module`` / ``attn_out_module``)."""
    lay = adapter.layout
    block = f"{lay.blocks}.{{}}"
    mlp = f"{block}.{lay.w_out.rsplit('.', 1)[0]}" if "." in lay.w_out else block
    attn = f"{block}.self_attn" if lay.blocks.startswith("model.") else f"{block}.attn"
    if pmet:
        attn_out = adapter.attn_out_module(0)
        name = next(n for n, m in adapter.blocks[0].named_modules() if m is attn_out)
        mlp, attn = f"{block}.{lay.w_out}", f"{block}.{name}"
    return {"rewrite_module_tmp": f"{block}.{lay.w_out}", "layer_module_tmp": block, "mlp_module_tmp": mlp,
            "attn_module_tmp": attn, "ln_f_module": lay.final_norm, "lm_head_module": lay.lm_head}


class _CudaToDevice:
    """``torch``, as seen by the published modules, with ``device="cuda"`` mapped to ``device``."""

    FACTORIES = ("zeros", "ones", "empty", "full", "eye", "tensor", "arange", "rand", "randn", "as_tensor",
                 "zeros_like", "ones_like")

    def __init__(self, device: torch.device):
        self._device = device

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in self.FACTORIES:
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _map_device(kwargs["device"], self._device)
                return value(*args, **kwargs)
            return factory
        return value


def _map_device(d, device: torch.device):
    if isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda":
        return device
    return d


@contextlib.contextmanager
def adapted(pub: Published, *, device: torch.device, mom2: dict[int, torch.Tensor], templates: list[str],
            layout: dict[str, str], log):
    """Run-time adaptation of the published code for one run (undone on exit)."""
    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    _patch_statistics(pub, patch, device=device, mom2=mom2, templates=templates, layout=layout)
    patch(pub.nethook, "Trace", _tuple_trace(pub.nethook, layout))
    if device.type != "cuda":
        _patch_cuda(pub, patch, device)
    try:
        with contextlib.redirect_stdout(log):
            yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _patch_statistics(pub: Published, patch: Callable[[object, str, object], None], *, device: torch.device,
                      mom2: dict[int, torch.Tensor], templates: list[str], layout: dict[str, str]) -> None:
    """Hand blueedit's ``C_0`` (by module name) and context templates to the published entry points."""
    by_name = {layout["rewrite_module_tmp"].format(l): m for l, m in mom2.items()}

    def get_cov(model, tok, layer_name, *args, inv=False, **kwargs):
        if layer_name not in by_name:
            raise KeyError(f"no C_0 for {layer_name}")
        c = by_name[layer_name].to(device=device, dtype=torch.float32)
        return torch.inverse(c) if inv else c

    published_templates = [["{}"], [t for t in templates if t != "{}"]]
    for mod in pub.entry_modules:
        patch(mod, "get_cov", get_cov)
        patch(mod, "CONTEXT_TEMPLATES_CACHE", published_templates)


def _tuple_trace(nethook, layout: dict[str, str]) -> type:
    """The published ``nethook.Trace``, with blocks that return a tensor shown to it as a 1-tuple."""
    block_re = re.compile("^" + re.escape(layout["layer_module_tmp"]).replace(r"\{\}", r"\d+") + "$")
    base_trace = nethook.Trace

    class Trace(base_trace):
        def __init__(self, module, layer=None, **kwargs):
            target = nethook.get_module(module, layer) if layer is not None else module
            box = {}

            def wrap(m, inputs, output):
                if isinstance(output, torch.Tensor):
                    box["t"] = (output,)
                    return box["t"]
                return None

            def unwrap(m, inputs, output):
                if output is box.get("t"):
                    return output[0]
                return None

            self._tuple_hooks = []
            if layer is not None and block_re.match(layer):
                self._tuple_hooks.append(target.register_forward_hook(wrap))
            super().__init__(module, layer, **kwargs)
            if self._tuple_hooks:
                self._tuple_hooks.append(target.register_forward_hook(unwrap))

        def close(self):
            super().close()
            for h in self._tuple_hooks:
                h.remove()

    return Trace


def _patch_cuda(pub: Published, patch: Callable[[object, str, object], None], device: torch.device) -> None:
    """Redirect the published code's ``"cuda"`` placements (its ``torch``, ``Tensor.to`` / ``.cuda``) to ``device``."""
    proxy = _CudaToDevice(device)
    for mod in pub.modules:
        patch(mod, "torch", proxy)
    tensor_to, tensor_cuda = torch.Tensor.to, torch.Tensor.cuda

    def to(self, *args, **kwargs):
        args = tuple(_map_device(a, device) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"], device)
        return tensor_to(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        return tensor_to(self, device)

    patch(torch.Tensor, "to", to)
    patch(torch.Tensor, "cuda", cuda)
    del tensor_cuda


def tokenization_check(pub: Published, tok, requests, templates: list[str], limit: int = 5) -> dict:
    """Do both sides feed the model the same tokens? For every record and every prompt of its target
    optimization (each context template + the target's tokens but the last, and the KL prompt),
    compare the published token ids (the filled text tokenized whole, as its ``compute_z`` does) and
    fact-token index (its ``get_words_idxs_in_templates``, subject's last token) with blueedit's
    (:func:`~blueedit.models.tokens.encode_prompt` + the target ids)."""
    from blueedit.models.tokens import encode_prompt, tokenize_target

    words_idxs = importlib.import_module("rome.repr_tools").get_words_idxs_in_templates
    ids_differ, fact_differ, examples, prompts = 0, 0, [], 0
    for r in requests:
        target = tokenize_target(tok, r.target_new)
        for c in list(templates) + ["{} is a"]:
            kl = c == "{} is a"
            filled = c if kl else c.replace("{}", r.prompt, 1)
            text = filled if kl else filled + tok.decode(target[:-1])
            pub_ids = tok(text.replace("{}", r.subject, 1))["input_ids"]
            pub_fact = words_idxs(tok, [text], [r.subject], "last")[0][0]
            ids, fact = encode_prompt(tok, filled, r.subject)
            ids = ids + ([] if kl else target[:-1])
            prompts += 1
            if pub_fact < 0:
                pub_fact += len(pub_ids)
            bad = []
            if pub_ids != ids:
                ids_differ += 1
                bad.append("token ids")
            if pub_fact != fact:
                fact_differ += 1
                bad.append(f"fact index {pub_fact} vs {fact}")
            if bad and len(examples) < limit:
                examples.append({"case_id": r.case_id, "prompt": text, "subject": r.subject, "differs": bad})
    return {"records": len(requests), "prompts": prompts, "token_ids_differ": ids_differ,
            "fact_index_differs": fact_differ, "examples": examples}


def published_projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's null-space projection as the published driver builds it: left singular vectors
    of ``C_0`` whose singular values are below ``threshold``, ``P = U_s U_sᵀ`` (float32)."""
    U, S, _ = torch.linalg.svd(mom2.float().cpu(), full_matrices=False)
    U_s = U[:, S < threshold]
    return U_s @ U_s.T


def published_request(r) -> dict:
    return {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject,
            "target_new": {"str": r.target_new}, "target_true": {"str": r.target_true or ""}}


class Recorder:
    """What a run leaves after each round: its editing seconds, each edited layer's update
    ``ΔW = W_after − W_before`` (Frobenius norm and a signed fingerprint ``⟨ΔW, R_l⟩`` with a fixed
    random ``R_l``, so two implementations' updates can be compared without storing them), and, with
    ``--eval-every-round`` or after the last round, the metrics of the records edited so far. The
    results file is rewritten after every round (``checkpoint``), so an interrupted run keeps its
    finished rounds."""

    def __init__(self, run: dict, model, tok, adapter, requests, rounds, eval_every_round: bool, checkpoint):
        self.run, self.model, self.tok, self.adapter = run, model, tok, adapter
        self.requests, self.rounds, self.eval_every_round, self.checkpoint = requests, rounds, eval_every_round, checkpoint
        run.update(round_seconds=[], round_cpu_seconds=[], update_norms=[], update_fingerprints=[], per_round=[],
                   complete=False)
        self._probe: dict[int, torch.Tensor] = {}

    def probe(self, layer: int, shape) -> torch.Tensor:
        if layer not in self._probe:
            g = torch.Generator().manual_seed(1000 + layer)
            self._probe[layer] = torch.randn(*shape, generator=g, dtype=torch.float64)
        return self._probe[layer]

    def before(self, layers) -> dict[int, torch.Tensor]:
        return {l: self.adapter.get_w_out(l).cpu() for l in layers}

    def round_done(self, index: int, before: dict[int, torch.Tensor], seconds: float, cpu_seconds: float) -> None:
        run = self.run
        deltas = {l: self.adapter.get_w_out(l).cpu().double() - w.double() for l, w in before.items()}
        run["round_seconds"].append(seconds)
        run["round_cpu_seconds"].append(cpu_seconds)
        run["update_norms"].append({str(l): float(torch.linalg.matrix_norm(d)) for l, d in deltas.items()})
        run["update_fingerprints"].append({str(l): float((d * self.probe(l, d.shape)).sum())
                                           for l, d in deltas.items()})
        last = index == len(self.rounds) - 1
        if self.eval_every_round or last:
            done = sum(len(c) for c in self.rounds[: index + 1])
            entry = {"round": index + 1, "edits": done, "seconds": sum(run["round_seconds"]),
                     "cpu_seconds": sum(run["round_cpu_seconds"])}
            entry.update(evaluate(self.model, self.tok, self.requests[:done]))
            run["per_round"].append(entry)
            print(f"  {_label(run)} [{run['side']}] after {done} edits: "
                  + ", ".join(f"{k} {entry[k]:.2f}" for k in METRICS)
                  + f", {entry['seconds'] / done:.2f} s/edit", flush=True)
        if last:
            final = run["per_round"][-1]
            run.update({k: final[k] for k in (*METRICS, "eval_seconds")})
            run["seconds"] = final["seconds"]
            run["seconds_per_edit"] = final["seconds"] / final["edits"]
            run["cpu_seconds"] = final["cpu_seconds"]
            run["cpu_seconds_per_edit"] = final["cpu_seconds"] / final["edits"]
            run["complete"] = True
        self.checkpoint()


def published_state(pair: Pair, hp, adapter, mom2, edited: list[int]) -> dict:
    """The sequential-editing state the published driver keeps between rounds: the edit history
    ``cache_c`` (given to MEMIT_seq, AlphaEdit and PMET_seq only) and AlphaEdit's projections ``P``.
    MEMIT_prune's original weights are added by its first round (:func:`published_round`)."""
    state: dict = {}
    if pair.alg in ("MEMIT_seq", "AlphaEdit", "PMET_seq"):
        d_k = adapter.key_size(edited[0])
        state["cache_c"] = torch.zeros(len(edited), d_k, d_k)
    if pair.alg == "AlphaEdit":
        state["P"] = torch.stack([published_projection(mom2[l], hp.nullspace_threshold) for l in edited])
    return state


def published_round(pub: Published, pair: Pair, model, tok, reqs: list[dict], hp, state: dict, restrain: bool) -> None:
    """One round of the published driver (experiments/evaluate.py) for ``pair``: its entry point
    with the arguments the driver passes. ``restrain``: MEMIT_prune's round after which the driver
    restrains the accumulated edit (:func:`published_prune_restraint`)."""
    alg = pair.alg
    if alg == "AlphaEdit":
        _, state["cache_c"] = pub.alphaedit.apply_AlphaEdit_to_model(model, tok, reqs, hp, cache_c=state["cache_c"],
                                                                      P=state["P"])
    elif alg == "MEMIT_seq":
        _, state["cache_c"] = pub.memit_seq.apply_memit_seq_to_model(model, tok, reqs, hp, cache_c=state["cache_c"])
    elif alg == "PMET_seq":
        _, state["cache_c"] = pub.pmet_seq.apply_pmet_seq_to_model(model, tok, reqs, hp, cache_c=state["cache_c"])
    elif alg == "MEMIT_rect":
        pub.memit_rect.apply_memit_rect_to_model(model, tok, reqs, hp, return_orig_weights=False)
    elif alg == "MEMIT_prune":  # the first round also returns the weights before any edit
        first = "original" not in state
        _, originals = pub.memit.apply_memit_to_model(model, tok, reqs, hp, return_orig_weights=first)
        if first:
            state["original"] = originals
        if restrain:
            published_prune_restraint(pub.nethook, model, state["original"])
    else:
        raise ValueError(f"no published driver for {alg!r}")


def published_prune_restraint(nethook, model, originals: dict[str, torch.Tensor]) -> None:
    """PRUNE as the published driver applies it (experiments/evaluate.py, ``MEMIT_prune``, after the
    round ``num_edits / edits_per_round − 1``), in the weights' precision: for each edited weight
    ``W`` with its value ``W_0`` before the first round, ``Δ = W − W_0 = U S Vᵀ``, every singular
    value ``s`` above ``σ``, the largest singular value of ``W_0``, becomes ``log s − log σ + σ``,
    and ``U S' Vᵀ`` is added to the edited weight: ``W ← W + restrain(Δ) = W_0 + Δ + restrain(Δ)``
    (the driver adds it to the current, not the original, weights; blueedit ``prune_base: current``)."""
    with torch.no_grad():
        for name, w0 in originals.items():
            w = nethook.get_parameter(model, name)
            w0 = w0.to(w.device)
            sigma = torch.linalg.svdvals(w0).max()
            U, S, Vh = torch.linalg.svd(w - w0, full_matrices=False)
            S = torch.where(S > sigma, torch.log(S) - torch.log(sigma) + sigma, S)
            w.add_((U * S) @ Vh)


def run_published(pub: Published, pair: Pair, args, model, tok, adapter, mom2, templates, rounds, device,
                  loss_layer: int, log, rec: Recorder) -> None:
    """The published sequential-editing loop for ``pair`` (as its driver script runs it)."""
    layout = module_layout(adapter, pmet=pair.method == "pmet")
    layers = args.base.layers
    hp = pub.hparams(pair, layout, layers, args, loss_layer)
    edited = list(hp.layers)
    rec.run["edited_layers"] = edited
    rec.run["hparams"] = dict(vars(hp))
    t_setup = time.perf_counter()
    state = published_state(pair, hp, adapter, mom2, edited)
    rec.run["setup_seconds"] = time.perf_counter() - t_setup
    num_records = sum(len(c) for c in rounds)
    for i, chunk in enumerate(rounds):
        before = rec.before(edited)
        reqs = [published_request(r) for r in chunk]
        restrain = i == num_records / args.edits_per_round - 1  # the driver's test (evaluate.py, MEMIT_prune)
        with adapted(pub, device=device, mom2={l: mom2[l] for l in edited}, templates=templates, layout=layout,
                     log=log):
            c0 = time.process_time()
            with C.timed(str(device)) as t:
                published_round(pub, pair, model, tok, reqs, hp, state, restrain)
            cpu = time.process_time() - c0
        rec.round_done(i, before, t["seconds"], cpu)


def run_blueedit(pair: Pair, args, model, tok, adapter, mom2, templates, rounds, loss_layer: int,
                 rec: Recorder) -> None:
    """blueedit's :class:`~blueedit.editing.editor.Editor` over the same rounds."""
    from dataclasses import replace

    from blueedit.editing.setup import build_editor

    target = replace(args.base.target, loss_layer=loss_layer, **dict(pair.target))
    editing = dict(pair.editing)
    if pair.method == "rect":
        d, d_k = adapter.hidden_size(), adapter.key_size(args.base.layers[0])
        editing["rect_keep"] = published_rect_keep(d * d_k)
    hp = replace(args.base, method=pair.method, strategy=pair.strategy, target=target, **editing)
    rec.run["edited_layers"] = hp.edited_layers
    rec.run["hparams"] = {"method": hp.method, "strategy": hp.strategy, "layers": hp.layers,
                          "lam": hp.mom2_update_weight, "L2": hp.L2, "nullspace_threshold": hp.nullspace_threshold,
                          "use_history": hp.use_history, "rect_keep": hp.rect_keep, "prune_base": hp.prune_base,
                          **{k: getattr(target, k) for k in ("v_num_grad_steps", "v_lr", "v_weight_decay",
                                                             "kl_factor", "clamp_norm_factor", "loss_layer",
                                                             "top1_nll_factor", "top1_kl_stop")}}
    t_setup = time.perf_counter()
    editor = build_editor(model, tok, hp, adapter=adapter, mom2=mom2, context_templates=templates)
    rec.run["setup_seconds"] = time.perf_counter() - t_setup
    steps = []
    for i, chunk in enumerate(rounds):
        before = rec.before(hp.edited_layers)
        c0 = time.process_time()
        with C.timed(args.device) as t:
            report = editor.edit_round(chunk, i)
            if i == len(rounds) - 1:
                editor.finalize()  # PRUNE's restraint; a no-op for the other methods
        cpu = time.process_time() - c0
        for v in report.target_steps.values():
            steps += list(v)
        rec.run["mean_target_steps"] = sum(steps) / max(len(steps), 1)
        rec.round_done(i, before, t["seconds"], cpu)


def evaluate(model, tok, requests) -> dict:
    from blueedit.evaluation.editing_metrics import evaluate_requests

    t0 = time.perf_counter()
    res = evaluate_requests(model, tok, requests)
    out = {k: res.metrics.get(k, float("nan")) for k in METRICS}
    out["eval_seconds"] = time.perf_counter() - t0
    return out


# -- table ---------------------------------------------------------------------------------------
def _label(run: dict) -> str:
    pair = PAIRS[run["pair"]]
    if run["side"] == "published":
        return pair.published
    return f"{pair.method} ({pair.strategy})"


def _entry(run: dict, edits: int | None) -> dict | None:
    """The run's evaluation after ``edits`` edits (``None``: its last one)."""
    entries = run.get("per_round") or []
    if edits is None:
        return entries[-1] if entries else None
    return next((e for e in entries if e["edits"] == edits), None)


def _common_edits(by_side: dict[str, dict]) -> int | None:
    """The most edits after which every side of a pair was evaluated."""
    sets = [{e["edits"] for e in r.get("per_round") or []} for r in by_side.values()]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def update_agreement(a: dict, b: dict) -> dict | None:
    """How far apart two runs' per-round updates are, over the rounds both finished and the layers
    both edited: the largest difference of ``‖ΔW_l‖`` and of the fingerprint ``⟨ΔW_l, R_l⟩``, each
    relative to the round's largest update norm ``max_l ‖ΔW_l‖`` (a layer whose update is nearly
    zero, as BLUE's last layer once its first layer has done the edit, would otherwise divide
    round-off by zero)."""
    n = min(len(a.get("update_norms") or []), len(b.get("update_norms") or []))
    if n == 0:
        return None
    worst_norm = worst_fp = 0.0
    for i in range(n):
        na, nb = a["update_norms"][i], b["update_norms"][i]
        scale = max([abs(v) for v in na.values()] + [1e-30])
        for l, va in na.items():
            if l not in nb:
                continue
            worst_norm = max(worst_norm, abs(va - nb[l]) / scale)
            fa, fb = a["update_fingerprints"][i][l], b["update_fingerprints"][i][l]
            worst_fp = max(worst_fp, abs(fa - fb) / scale)
    return {"rounds": n, "norm": worst_norm, "fingerprint": worst_fp}


def markdown_table(runs: list[dict], pre: dict[str, dict] | None) -> str:
    """Per pair: the unedited model, both sides (compared after the same number of edits, on the
    records edited so far), and the difference blueedit − published. ``pre`` maps a number of edits
    to the unedited model's metrics on that many first records."""
    head = ["method", "implementation", "edits", *METRICS, "seconds / edit", "CPU seconds / edit"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    f2 = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    pre = pre or {}
    for name, pair in PAIRS.items():
        by_side = {r["side"]: r for r in runs if r["pair"] == name}
        if not by_side:
            continue
        edits = _common_edits(by_side) if len(by_side) == 2 else None
        rows, shown = [], {}
        for side in SIDES:
            r = by_side.get(side)
            if r is None:
                continue
            e = _entry(r, edits)
            cells = [pair.published, f"{side}: {_label(r)}"]
            if e is None:
                status = "error" if "error" in r else "not evaluated"
                cells += ["-"] + [status] * len(METRICS) + ["-", "-"]
            else:
                shown[side] = e
                cpu = e.get("cpu_seconds")
                cells += [str(e["edits"])] + [f2(e.get(k)) for k in METRICS] + [
                    f"{e['seconds'] / e['edits']:.2f}", "-" if cpu is None else f"{cpu / e['edits']:.2f}"]
            rows.append("| " + " | ".join(cells) + " |")
        n = next(iter(shown.values()))["edits"] if shown else None
        if n is not None and str(n) in pre:
            lines.append(f"| {pair.published} | unedited model | {n} | "
                         + " | ".join(f2(pre[str(n)].get(k)) for k in METRICS) + " | - | - |")
        lines += rows
        if len(shown) == 2:
            b, p = shown["blueedit"], shown["published"]
            diff = [f"{b[k] - p[k]:+.2f}" for k in METRICS]
            ratio = (p["seconds"] / p["edits"]) / (b["seconds"] / b["edits"]) if b["seconds"] > 0 else float("nan")
            cpu_ratio = (f"{(p['cpu_seconds'] / p['edits']) / (b['cpu_seconds'] / b['edits']):.2f}x faster"
                         if p.get("cpu_seconds") and b.get("cpu_seconds") else "-")
            lines.append(f"| {pair.published} | difference (blueedit − published) | {b['edits']} | " + " | ".join(diff)
                         + f" | {ratio:.2f}x faster | {cpu_ratio} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    cfg = results.get("setup", {})
    head = (f"{results.get('model')}, first {results.get('num_edits')} `{results.get('dataset')}` records in rounds "
            f"of {cfg.get('edits_per_round')}, C_0 from {cfg.get('stats_samples')} {cfg.get('stats_corpus')} texts "
            f"(the same tensor on both sides), λ {cfg.get('lam'):g}, v_lr {cfg.get('v_lr'):g}, layers "
            f"{cfg.get('layers')}, loss layer {cfg.get('loss_layer')}, {cfg.get('steps')} target steps, "
            f"AlphaEdit L2 {cfg.get('L2'):g} / null-space threshold {cfg.get('nullspace_threshold'):g}; "
            f"{results.get('device')}.")
    notes = ["Metrics: blueedit's evaluator (`evaluate_requests`) on each side's model, over the records edited "
             "so far (`edits`). Seconds / edit: editing rounds only (no C_0, no AlphaEdit projections, no "
             "evaluation), wall clock and this process's CPU time (with one thread, the time on a quiet core; "
             "robust on a shared machine). The difference row's time cells are published / blueedit."]
    tc = results.get("tokenization")
    if tc:
        notes.append(f"Inputs of the target optimization: {tc['prompts']} prompts ({tc['records']} records × context "
                     f"templates and KL prompt) tokenized by both sides; token ids differ in {tc['token_ids_differ']}, "
                     f"the fact-token index in {tc['fact_index_differs']}.")
    for name, pair in PAIRS.items():
        by_side = {r["side"]: r for r in results["runs"] if r["pair"] == name}
        if len(by_side) == 2:
            agree = update_agreement(by_side["published"], by_side["blueedit"])
            if agree:
                notes.append(f"{pair.published}: per-round weight updates ΔW_l over {agree['rounds']} round(s), "
                             f"largest difference between the two sides relative to the round's largest ‖ΔW_l‖: "
                             f"{agree['norm']:.1e} in ‖ΔW_l‖, {agree['fingerprint']:.1e} in ⟨ΔW_l, R_l⟩ (a fixed "
                             f"random R_l per layer).")
    return "\n".join([head, "", markdown_table(results["runs"], results.get("pre_edit_by_edits")),
                      "", *[f"- {n}" for n in notes]])


def write(results: dict, out: str, quiet: bool = False) -> None:
    results["table"] = render(results)
    if not quiet:
        print()
        print(results["table"], flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(path.with_suffix(".json"))
        path.with_suffix(".md").write_text(results["table"] + "\n")
        if not quiet:
            print(f"results written to {path.with_suffix('.json')} and {path.with_suffix('.md')}", flush=True)


def merge(files: list[str], out: str, record: C.RunRecord | None = None) -> dict:
    """Combine result files: the runs of all (a later file's run replaces an earlier one of the
    same pair and side), the first pre-edit evaluation, the first file's setup."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    for f, part in zip(files, parts):  # the runs must share model, records, C_0 setup and templates
        for key in ("model", "dataset", "num_edits", "setup", "context_templates"):
            if part.get(key) != parts[0].get(key):
                raise SystemExit(f"--merge: {f} differs from {files[0]} in {key!r}")
    results = {k: v for k, v in parts[0].items() if k not in ("runs", "table")}
    runs: dict[tuple[str, str], dict] = {}
    for part in parts:
        for key in ("pre_edit", "pre_edit_by_edits", "tokenization"):
            if results.get(key) is None and part.get(key) is not None:
                results[key] = part[key]
        for r in part["runs"]:
            runs[(r["pair"], r["side"])] = r
    results["runs"] = [runs[k] for k in sorted(runs, key=lambda k: (list(PAIRS).index(k[0]), SIDES.index(k[1])))]
    results["merged_from"] = list(files)
    if record is not None:
        results["merged_by"] = record.as_dict()
    write(results, out)
    return results


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, *, model=None, tokenizer=None, requests=None, texts=None) -> dict:
    """Run the comparison and return the results dict.

    ``model``/``tokenizer`` (edited in place, restored afterwards), ``requests`` and ``texts`` (the
    statistics corpus) replace the loaded ones (for tests).
    """
    record = C.RunRecord("vs_published", argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, record)
    config = args.as_dict()
    args.base, args.stats_config = C.benchmark_configs(parser, args)
    pairs, sides = check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    pub = Published(args.published) if "published" in sides else None  # import errors surface here, early
    requests = C.first_requests(args.dataset, args.num_edits, data_dir, requests)
    rounds = [requests[i : i + args.edits_per_round] for i in range(0, len(requests), args.edits_per_round)]

    layers = args.base.layers
    bench = C.prepare_edit_bench(args, args.stats_config, layers, data_dir=data_dir, model=model, tokenizer=tokenizer,
                                 texts=texts)
    loss_layer = bench.adapter.num_layers - 1 if args.base.target.loss_layer is None else args.base.target.loss_layer
    print(f"C_0 for layers {layers} in {bench.stats_seconds:.1f} s; context templates {bench.templates}", flush=True)

    results = results_header(args, record, config, bench, pub, len(requests), loss_layer)
    if pub is not None:
        results["tokenization"] = tokenization_check(pub, bench.tokenizer, requests, bench.templates)
        tc = results["tokenization"]
        print(f"tokenization: {tc['prompts']} prompts of {tc['records']} records, token ids differ in "
              f"{tc['token_ids_differ']}, fact index in {tc['fact_index_differs']}", flush=True)
    if not args.no_pre_edit:
        evaluate_pre_edit(args, bench, requests, rounds, results)
    run_every_pair(args, pairs, sides, pub, bench, requests, rounds, device, loss_layer, results)
    results["run"] = record.as_dict()
    write(results, args.out)
    return results


def results_header(args, record: C.RunRecord, config: dict, bench: C.EditBench, pub: Published | None,
                   num_edits: int, loss_layer: int) -> dict:
    """The results before any run: command, versions, model, records, the shared setup, no runs yet."""
    base, target = args.base, args.base.target
    return {
        "command": record.command, "config": config, "versions": C.versions(),
        "device": C.device_description(args.device),
        "model": bench.model_id if bench.model_id.startswith("given-") else args.model,
        "dataset": args.dataset, "num_edits": num_edits, "published_checkout": str(pub.root) if pub else None,
        "setup": {"edits_per_round": args.edits_per_round, "stats_samples": args.stats_config.num_samples,
                  "stats_corpus": args.stats_config.corpus, "lam": base.mom2_update_weight,
                  "v_lr": target.v_lr, "layers": base.layers, "loss_layer": loss_layer,
                  "steps": target.v_num_grad_steps, "L2": base.L2,
                  "nullspace_threshold": base.nullspace_threshold, "kl_factor": target.kl_factor,
                  "weight_decay": target.v_weight_decay, "clamp": target.clamp_norm_factor},
        "stats_seconds": bench.stats_seconds, "context_templates": bench.templates, "pre_edit": None,
        "pre_edit_by_edits": None, "runs": [],
    }


def evaluate_pre_edit(args, bench: C.EditBench, requests, rounds, results: dict) -> None:
    """Evaluate the unedited model on the records edited after each evaluated round (``results["pre_edit*"]``)."""
    ends = [sum(len(c) for c in rounds[: i + 1]) for i in range(len(rounds))]
    results["pre_edit_by_edits"] = {str(n): evaluate(bench.model, bench.tokenizer, requests[:n])
                                    for n in (ends if args.eval_every_round else ends[-1:])}
    results["pre_edit"] = results["pre_edit_by_edits"][str(len(requests))]
    print("pre-edit: " + ", ".join(f"{k} {results['pre_edit'][k]:.2f}" for k in METRICS), flush=True)


def run_every_pair(args, pairs: list[Pair], sides: list[str], pub: Published | None, bench: C.EditBench, requests,
                   rounds, device: torch.device, loss_layer: int, results: dict) -> None:
    """Run every pair on every side from the original weights; the results file is rewritten as runs progress."""
    model, tokenizer, adapter, mom2, templates = bench.model, bench.tokenizer, bench.adapter, bench.mom2, bench.templates

    def checkpoint():
        if args.out:
            write(results, args.out, quiet=True)

    log_cm = open(args.published_log, "a", buffering=1) if args.published_log else open(os.devnull, "w")
    with bench.restored(), log_cm as log:
        for pair in pairs:
            for side in sides:
                bench.restore()
                run = {"pair": pair.name, "side": side}
                results["runs"].append(run)
                rec = Recorder(run, model, tokenizer, adapter, requests, rounds, args.eval_every_round, checkpoint)
                try:
                    if side == "published":
                        run_published(pub, pair, args, model, tokenizer, adapter, mom2, templates, rounds, device,
                                      loss_layer, log, rec)
                    else:
                        run_blueedit(pair, args, model, tokenizer, adapter, mom2, templates, rounds, loss_layer,
                                     rec)
                except Exception as e:  # one failed run should not lose the others
                    import traceback

                    run["error"] = f"{type(e).__name__}: {e}"
                    run["traceback"] = traceback.format_exc()
                    checkpoint()
                print(f"{_label(run)} [{side}]: " + (run["error"] if "error" in run else
                      ", ".join(f"{k} {run[k]:.2f}" for k in METRICS)
                      + f", {run['seconds_per_edit']:.2f} s/edit"), flush=True)


if __name__ == "__main__":
    main()
