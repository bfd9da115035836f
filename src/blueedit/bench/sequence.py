"""The long-sequence benchmark: ``blueedit fit`` over N edits, metrics of everything edited so far.

For each ``METHOD:STRATEGY`` of ``--runs`` this runs ``blueedit fit`` (the CLI entry point, in this
process: LightningCLI, ``EditingModule``, ``EditDataModule``) on the base ``--config`` with:

- ``--dataset`` (``counterfact_eval``, ``zsre_eval``, ``counterfact-easyedit``, a records file, or
  sets of one format joined with ``+``), ``--num-edits`` N in rounds of ``--edits-per-round`` E;
- ``SequenceEvaluation``: efficacy / generalization / specificity of all records edited so far,
  every ``--eval-every`` K edits (and before editing, on all N records); teacher-forced, and with
  ``--wild`` also in the wild (the model's greedy answers, ``*_wild``);
- ``GeneralCapability`` (GLUE-style subset + perplexity) every ``--general-every`` edits,
  ``HiddenStateDrift`` every round, ``WeightShiftError`` every ``--wse-every`` edits;
- a ``ModelCheckpoint`` after every round (``last.ckpt``) in the run's work directory
  ``<workdir>/<name>/<method>_<strategy>`` (default workdir ``~/.cache/blueedit/sequence``).

Running the same command again continues an interrupted run from its ``last.ckpt``
(``--ckpt_path``; the round loader, the editor state and every callback's history are restored, so
the curve continues and the final weights are the ones of an uninterrupted run), and skips runs
that finished (their ``runs/<run>.json`` exists in the results directory). A run's work directory
remembers its command; a different command for the same run is refused (``--restart`` starts it
over).

Written under ``--out``/``<name>`` (default ``benchmarks/results/<name>``), assembled from the
finished runs' histories:

- ``runs/<method>_<strategy>.json``: the run's histories (sequence metrics, general capability,
  drift, weight shift error, per-round seconds and update norms) and its command;
- ``sequence.csv``: one row per run × checkpoint (in edits) × metric;
- ``curves.png``: metric against edits, one line per method × strategy;
- ``table.md``: pre-edit and final values per run, and the time it took (each column names its
  protocol: TF = teacher forcing, wild = generated answers);
- ``retention_<run>_<metric>.csv`` / ``.png`` / ``_forgetting.csv``: the retention matrix of
  ``efficacy`` (and ``efficacy_wild``): per evaluation, the success of each round's edits.

Example (the paper's protocol, CounterFact, MEMIT vs MEMIT + BLUE)::

    python -m blueedit.bench.sequence --name counterfact_memit --dataset counterfact-easyedit --num-edits 1000 \\
        --runs memit:distribute memit:boundary   # also pmet:..., hse:... (MEMIT + HSE options), alphaedit, prune, rect
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from blueedit.bench import harness as C

DEFAULT_CONFIG = "configs/smollm2-135m/memit.yaml"
DEFAULT_WORKDIR = "~/.cache/blueedit/sequence"
SEQUENCE_METRICS = ("efficacy", "generalization", "specificity")
CALLBACKS = {
    "sequence": "blueedit.callbacks.sequence.SequenceEvaluation",
    "general": "blueedit.callbacks.progress.GeneralCapability",
    "drift": "blueedit.callbacks.drift.HiddenStateDrift",
    "weight_shift": "blueedit.callbacks.weight_shift.WeightShiftError",
    "health": "blueedit.callbacks.health.HealthGate",
}


def parse_args(argv: list[str] | None) -> Namespace:
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--name", help="results / work subdirectory (default: <dataset>_<N>x<E>)")
    p.add_argument("--runs", nargs="+", default=["memit:distribute", "memit:boundary"], metavar="METHOD:STRATEGY")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="base blueedit config (relative to the repository)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="blueedit config overrides, e.g. model.editing.target.v_num_grad_steps=20")
    p.add_argument("--dataset", default="counterfact_eval", help="counterfact_eval, zsre_eval or a records file")
    p.add_argument("--num-edits", type=int, default=1000)
    p.add_argument("--edits-per-round", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100, help="edits between evaluations of all edited records")
    p.add_argument("--general-every", type=int, default=500, help="edits between general-capability runs (0: off)")
    p.add_argument("--general-tasks", nargs="+", default=None, help="GLUE-style tasks (default: all)")
    p.add_argument("--general-examples", type=int, default=50)
    p.add_argument("--general-perplexity-texts", type=int, default=20)
    p.add_argument("--drift-every", type=int, default=None, help="edits between drift measurements "
                   "(default: every round; 0: off)")
    p.add_argument("--drift-probes", type=int, default=50)
    p.add_argument("--wse-every", type=int, default=1000,
                   help="diagnose the weight shift error of rounds 0, n, 2n, ... with n = this / E rounds (0: off); "
                        "a diagnosed round costs one extra target optimization per edited layer")
    p.add_argument("--wse-contribution", action="store_true", help="also the contribution scores")
    p.add_argument("--wild", action="store_true", help="also evaluate in the wild (greedy answers, *_wild metrics)")
    p.add_argument("--wild-max-new-tokens", type=int, default=40, help="token cap of one answer in the wild")
    p.add_argument("--wild-neighborhood", type=int, default=None,
                   help="answer only the first this many neighborhood prompts of a record in the wild (default: all)")
    p.add_argument("--health-gate", default=None, metavar="SIGNAL:MAX_RATIO",
                   help="undo (refuse) a round whose health signal crosses MAX_RATIO: perplexity:1.5 (WikiText-2 "
                        "chunks against the unedited model) or update_norm:3 (against the first round)")
    p.add_argument("--data-dir", default=None, help="benchmark data (default $BLUEEDIT_DATA_DIR or ../shared/data)")
    p.add_argument("--workdir", default=None, help=f"checkpoints and logs (default {DEFAULT_WORKDIR}), outside the repo")
    p.add_argument("--out", default=str(C.RESULTS), help="results root ('' : none)")
    p.add_argument("--restart", action="store_true", help="discard the runs' work directories and start over")
    p.add_argument("--report-only", action="store_true", help="only re-assemble CSV / PNG / table from runs/*.json")
    p.add_argument("--keep-csv-runs", action="store_true",
                   help="with --report-only: also report the runs of --runs that have no runs/<run>.json but "
                        "have rows in the existing sequence.csv (from those rows; their edit time is unknown)")
    p.add_argument("--report-partial", action="store_true",
                   help="with --report-only: also report unfinished runs from their last checkpoint (marked partial)")
    p.add_argument("--stop-after-rounds", type=int, default=None,
                   help="(tests) stop each run after this many rounds, as an interruption would")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for spec in args.runs:
        if spec.count(":") != 1:
            p.error(f"--runs {spec!r}: expected METHOD:STRATEGY, e.g. memit:boundary")
    if args.keep_csv_runs and not args.report_only:
        p.error("--keep-csv-runs needs --report-only")
    if args.health_gate is not None:
        signal, _, ratio = args.health_gate.partition(":")
        try:
            args.health_gate = {"signal": signal, "max_ratio": float(ratio)}
        except ValueError:
            p.error(f"--health-gate {args.health_gate!r}: expected SIGNAL:MAX_RATIO, e.g. perplexity:1.5")
        if signal not in ("perplexity", "update_norm") or not args.health_gate["max_ratio"] > 0:
            p.error(f"--health-gate {signal}:{ratio}: SIGNAL is perplexity or update_norm, MAX_RATIO > 0")
    for o in args.overrides:
        if "=" not in o:
            p.error(f"--set {o!r}: expected KEY=VALUE")
    for opt in ("num_edits", "edits_per_round", "eval_every"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be >= 1")
    args.name = args.name or f"{Path(args.dataset).stem}_{args.num_edits}x{args.edits_per_round}"
    return args


def run_key(spec: str) -> str:
    method, strategy = spec.split(":")
    return f"{method}_{strategy}"


def every_rounds(every_edits: int, edits_per_round: int) -> int:
    """A number of edits as a number of rounds, at least 1."""
    return max(1, math.ceil(every_edits / edits_per_round))


def run_config(args: Namespace, spec: str, run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """The generated part of the run's blueedit config (layered over ``--config``)."""
    method, strategy = spec.split(":")
    E = args.edits_per_round
    callbacks: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "save_top_k": 0,
                       "every_n_train_steps": 1}},
        {"class_path": CALLBACKS["sequence"], "init_args": {"every_n_edits": args.eval_every}},
    ]
    if args.general_every > 0:
        init = {"every_n_rounds": every_rounds(args.general_every, E), "num_examples": args.general_examples,
                "perplexity_texts": args.general_perplexity_texts}
        if args.general_tasks:
            init["tasks"] = list(args.general_tasks)
        callbacks.append({"class_path": CALLBACKS["general"], "init_args": init})
    drift_every = E if args.drift_every is None else args.drift_every
    if drift_every > 0:
        callbacks.append({"class_path": CALLBACKS["drift"],
                          "init_args": {"num_probes": args.drift_probes,
                                        "every_n_rounds": every_rounds(drift_every, E)}})
    if args.health_gate is not None:
        callbacks.append({"class_path": CALLBACKS["health"], "init_args": dict(args.health_gate)})
    if args.wse_every > 0:
        callbacks.append({"class_path": CALLBACKS["weight_shift"],
                          "init_args": {"every_n_rounds": every_rounds(args.wse_every, E),
                                        "contribution": bool(args.wse_contribution)}})
    return {
        "trainer": {
            "default_root_dir": str(run_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "logs", "flush_logs_every_n_steps": 1}},
            "callbacks": callbacks,
        },
        "model": {"editing": editing_config(method, strategy), "evaluate": False,
                  **({"wild_metrics": True, "wild": {"max_new_tokens": args.wild_max_new_tokens,
                                                    "neighborhood_prompts": args.wild_neighborhood}}
                     if args.wild else {})},
        "data": {"dataset": getattr(args, "dataset_source", args.dataset), "data_dir": str(data_dir),
                 "num_edits": args.num_edits,
                 "edits_per_round": E},
    }


def editing_config(method: str, strategy: str) -> dict[str, Any]:
    """``model.editing`` of a run: the engine method, or a benchmark preset (``pmet``, ``hse``)."""
    engine, editing, target = C.method_presets().get(method, (method, {}, {}))
    out: dict[str, Any] = {"method": engine, "strategy": strategy, **editing}
    if target:
        out["target"] = dict(target)
    return out


def run_identity(args: Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """What must not change between the invocations that make one run: the base config as given,
    the overrides and the generated config without its paths (the work and data directories may
    move to another machine)."""
    cfg = json.loads(json.dumps(config))
    cfg["trainer"].pop("default_root_dir", None)
    cfg["trainer"]["logger"]["init_args"].pop("save_dir", None)
    cfg["data"].pop("data_dir", None)
    cfg["data"]["dataset"] = args.dataset  # a joined set's file lives in the work directory
    for cb in cfg["trainer"]["callbacks"]:
        cb["init_args"].pop("dirpath", None)
    config_path = Path(args.config).expanduser().resolve()
    try:
        config_name = config_path.relative_to(C.REPO).as_posix()
    except ValueError:
        config_name = str(config_path)
    return {"config": config_name, "overrides": list(args.overrides), "generated": cfg}


def _find(callbacks, class_path: str):
    name = class_path.rsplit(".", 1)[1]
    return next((c for c in callbacks if type(c).__name__ == name), None)


def run_one(args: Namespace, spec: str, work_root: Path, data_dir: Path) -> dict[str, Any] | None:
    """Run (or continue) one method × strategy; its history dict when it finished, else ``None``."""
    key = run_key(spec)
    run_dir = work_root / key
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, key):
        if args.restart:
            for child in run_dir.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return _run_locked(args, spec, key, run_dir, data_dir)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, key: str):
    """Hold an exclusive lock on the run's work directory (two processes must not continue the
    same run); the operating system releases it when the process dies."""
    import fcntl

    with (run_dir / LOCK_NAME).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise SystemExit(f"run {key} in {run_dir} is being run by another process "
                             f"(pid {f.read().strip() or '?'})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_locked(args: Namespace, spec: str, key: str, run_dir: Path, data_dir: Path) -> dict[str, Any] | None:
    from blueedit.cli import run_cli

    config = run_config(args, spec, run_dir, data_dir)
    base = Path(args.config)
    base = base if base.is_absolute() else (C.REPO / base)
    if not base.is_file():
        raise FileNotFoundError(f"--config {args.config!r}: no such file")
    identity = run_identity(args, config)
    ident_path = run_dir / "command.json"
    if ident_path.is_file():
        before = json.loads(ident_path.read_text())
        if before != identity:
            raise SystemExit(f"run {key} in {run_dir} was started with a different command "
                             f"(see {ident_path}); pass --restart to start it over, or another --name / --workdir")
    else:
        ident_path.write_text(json.dumps(identity, indent=1))
    gen_path = run_dir / "sequence.yaml"
    gen_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    cli_args = ["fit", "--config", str(base), "--config", str(gen_path)]
    cli_args += [f"--{o}" for o in args.overrides]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        cli_args += ["--ckpt_path", str(last)]
        print(f"[sequence] {key}: resuming from {last}", flush=True)
    else:
        print(f"[sequence] {key}: starting in {run_dir}", flush=True)
    if args.stop_after_rounds is not None:
        cli_args += [f"--trainer.max_steps={args.stop_after_rounds}"]
    t0 = time.perf_counter()
    argv0 = sys.argv
    try:
        sys.argv = argv0[:1]  # LightningCLI reads ``args``; keep it from also seeing this script's options
        with warnings.catch_warnings():
            # manual optimization: the "pre-optimization state" ModelCheckpoint asks about does not exist
            warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
            cli = run_cli(cli_args)
    finally:
        sys.argv = argv0
    wall = time.perf_counter() - t0
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if module.editor is None or module.editor.state.rounds_done < dm.num_rounds:
        done = 0 if module.editor is None else module.editor.state.rounds_done
        print(f"[sequence] {key}: stopped after {done}/{dm.num_rounds} rounds; run the same command to continue",
              flush=True)
        return None
    cbs = trainer.callbacks
    hist = {name: (getattr(_find(cbs, path), "history", None)) for name, path in CALLBACKS.items()}
    record = {
        "run": key, "name": args.name, "method": spec.split(":")[0], "strategy": module.hp.strategy,
        "layers": list(module.hp.layers), "dataset": args.dataset, "num_edits": len(dm.requests),
        "edits_per_round": dm.edits_per_round, "eval_every": args.eval_every,
        "command": C.command_line("sequence", args.argv),
        "blueedit_args": cli_args[:cli_args.index("--ckpt_path")] if "--ckpt_path" in cli_args else cli_args,
        "rounds": [{"index": r.index, "seconds": r.seconds, "num_edits": len(r.case_ids),
                    "update_norms": {str(k): v for k, v in r.update_norms.items()}} for r in module.reports],
        "edit_seconds": sum(r.seconds for r in module.reports),
        "last_wall_seconds": wall,
        "work_dir": str(run_dir),
        "versions": C.versions(),
        "git": C.git_commit(),
        "finished": C.utc_now(),
        **hist,
    }
    (run_dir / "history.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def partial_record(args: Namespace, spec: str, run_dir: Path) -> dict[str, Any] | None:
    """The record of an unfinished run, read from its ``last.ckpt``: the callbacks' histories and
    the rounds done so far (``partial: true``; ``num_edits`` counts the edits done)."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    states = ckpt.get("callbacks", {})

    def history(path: str):
        name = path.rsplit(".", 1)[1]
        for key, state in states.items():
            if key.split("{")[0] == name and isinstance(state, dict):
                return state.get("history")
        return None

    reports = (ckpt.get("blueedit") or {}).get("reports") or []
    method, strategy = spec.split(":")
    done = sum(len(r["case_ids"]) for r in reports)
    return {
        "run": run_key(spec), "name": args.name, "method": method, "strategy": strategy, "dataset": args.dataset,
        "num_edits": done, "edits_per_round": args.edits_per_round, "eval_every": args.eval_every,
        "partial": True, "planned_edits": args.num_edits, "blueedit_args": [f"--{o}" for o in args.overrides],
        "command": C.command_line("sequence", [a for a in args.argv if a not in ("--report-only", "--report-partial")]),
        "rounds": [{"index": r["index"], "seconds": r["seconds"], "num_edits": len(r["case_ids"]),
                    "update_norms": {str(k): v for k, v in r["update_norms"].items()}} for r in reports],
        "edit_seconds": sum(r["seconds"] for r in reports),
        "work_dir": str(run_dir), "versions": C.versions(),
        **{name: history(path) for name, path in CALLBACKS.items()},
    }


# -- results ----------------------------------------------------------------------------------
def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per checkpoint (in edits) × metric of one run (a run kept from the CSV: its rows)."""
    if "csv_rows" in record:
        return record["csv_rows"]
    E, N = record["edits_per_round"], record["num_edits"]
    base = {"method": record["method"], "strategy": record["strategy"], "dataset": record["dataset"],
            "edits_per_round": E}

    def edits_after(round_index: int) -> int:
        return 0 if round_index < 0 else min((round_index + 1) * E, N)

    rows = []

    def add(round_index: int, metric: str, value: Any) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        rows.append({**base, "edits": edits_after(round_index), "round": round_index, "metric": metric,
                     "value": float(value)})

    for h in record.get("sequence") or []:
        for m, v in h["metrics"].items():
            add(h["round"], m, v)
    for h in record.get("general") or []:
        tasks = h.get("tasks") or {}
        for t, m in tasks.items():
            add(h["round"], f"general/{t}", m.get("main"))
        if tasks:
            add(h["round"], "general/mean", sum(m["main"] for m in tasks.values()) / len(tasks))
        add(h["round"], "general/perplexity", h.get("perplexity"))
    for h in record.get("drift") or []:
        for m in ("l2", "relative", "cosine", "probe_accuracy"):
            add(h["round"], f"drift/{m}", h.get(m))
    wse = record.get("weight_shift") or []
    for h in wse:
        for m in ("relative", "frobenius", "cosine", "distance"):
            add(h["round"], f"weight_shift/{m}/layer{h['layer']}", h["metrics"].get(m))
    for r in sorted({h["round"] for h in wse}):
        rel = [h["metrics"]["relative"] for h in wse if h["round"] == r and not math.isnan(h["metrics"]["relative"])]
        if rel:
            add(r, "weight_shift/relative/mean", sum(rel) / len(rel))
    for h in record.get("health") or []:
        add(h["round"], "health/ratio", h["ratio"])
        add(h["round"], "health/refused", float(h["refused"]))
    for r in record.get("rounds") or []:
        for l, n in r["update_norms"].items():
            add(r["index"], f"update_norm/layer{l}", n)
        if r["update_norms"]:  # the round's whole update: sqrt(sum over written layers of ‖Δ^l‖_F²)
            add(r["index"], "update_norm/total", math.sqrt(sum(n * n for n in r["update_norms"].values())))
    rows.sort(key=lambda row: (row["edits"], row["round"], row["metric"]))
    return rows


CSV_FIELDS = ["method", "strategy", "dataset", "edits_per_round", "edits", "round", "metric", "value"]


def write_csv(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    rows = [row for rec in records for row in rows_of(rec)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return rows


def target_site(rec: dict[str, Any]) -> str:
    """``editing.target.site`` of a run, as its ``--set`` gave it (``block``, the default, if unset)."""
    for a in rec.get("blueedit_args") or []:
        if a.startswith("--model.editing.target.site="):
            return a.split("=", 1)[1]
    return "block"


def _strategy(rec: dict[str, Any]) -> str:
    site = target_site(rec)
    return rec["strategy"] if site == "block" else f"{rec['strategy']}, site {site}"


def _label(rec: dict[str, Any]) -> str:
    blue = " + BLUE" if rec["strategy"] == "boundary" else ""
    site = target_site(rec)
    at = f" (site {site})" if site != "block" else ""
    return f"{rec['method'].upper() if rec['method'] != 'alphaedit' else 'AlphaEdit'}{blue}{at}"


PANELS = [
    ("efficacy", "Efficacy (%)"),
    ("generalization", "Generalization (%)"),
    ("specificity", "Specificity (%)"),
    ("efficacy_wild", "Efficacy in the wild (%)"),
    ("generalization_wild", "Generalization in the wild (%)"),
    ("locality_wild", "Neighborhood answers unchanged (%)"),
    ("fluency", "Fluency (generation entropy)"),
    ("consistency", "Consistency (TF-IDF)"),
    ("general/mean", "General capability (mean of tasks)"),
    ("general/perplexity", "Perplexity (WikiText-2 chunks)"),
    ("drift/relative", "Hidden-state drift (relative)"),
    ("weight_shift/relative/mean", "Weight shift error (rel., mean of layers)"),
    ("update_norm/total", "Update norm per round (all layers)"),
]


def plot_curves(records: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Metric against edits, one line per method × strategy (the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t) for m, t in PANELS if any(r["metric"] == m for r in rows)]
    cols = 3
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (metric, ylabel) in zip(axes.flat, panels):
        for rec in records:
            pts = sorted((r["edits"], r["value"]) for r in rows_of(rec) if r["metric"] == metric
                         and (r["round"] >= 0 or metric not in SEQUENCE_METRICS))
            if not pts:
                continue
            style = "-" if rec["strategy"] == "boundary" else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=_label(rec))
        ax.set_xlabel("edits")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 1 - 0.75 / fig.get_figheight()  # room for the title and the legend, in figure fractions
    fig.suptitle(title, y=1 - 0.12 / fig.get_figheight(), va="top", fontsize=10)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / fig.get_figheight()),
               ncol=max(1, len(labels)), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def markdown_table(records: list[dict[str, Any]], title: str) -> str:
    """Pre-edit and final value per run of the editing metrics, general capability and drift."""
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    cols = [("efficacy", "Eff. TF"), ("generalization", "Gen. TF"), ("specificity", "Spe. TF")]
    if any(r["metric"] == "efficacy_wild" for rec in records for r in rows_of(rec)):
        cols += [("efficacy_wild", "Eff. wild"), ("generalization_wild", "Gen. wild"),
                 ("specificity_wild", "Spe. wild"), ("locality_wild", "Loc. wild")]
    cols += [("general/mean", "General"), ("general/perplexity", "PPL"), ("drift/probe_accuracy", "Probe acc."),
            ("weight_shift/relative/mean", "WSE rel.")]
    lines = [f"### {title}", "",
             "| method | strategy | edits | " + " | ".join(c[1] for c in cols) + " | edit time | s / edit |",
             "|---|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for rec in records:
        rows = rows_of(rec)
        pre = {r["metric"]: r["value"] for r in rows if r["round"] == -1}
        final: dict[str, float] = {}
        for r in rows:  # the last value of each metric
            final[r["metric"]] = r["value"]
        secs = rec["edit_seconds"]
        cells = []
        for m, _ in cols:
            cells.append(f"{fmt(pre.get(m))} → {fmt(final.get(m))}" if m in pre else fmt(final.get(m)))
        edits = f"{rec['num_edits']} of {rec['planned_edits']} (partial)" if rec.get("partial") else rec["num_edits"]
        lines.append(f"| {rec['method']} | {_strategy(rec)} | {edits} | " + " | ".join(cells)
                     + (" | - | - |" if secs is None else f" | {_duration(secs)} | {secs / max(1, rec['num_edits']):.2f} |"))
    lines += ["", "Pre-edit → after the last edit (all edited records). TF: teacher forcing, Eff./Gen./Spe. in % "
              "(CounterFact: success rates; zsRE: token accuracy). wild: the model's greedy answer (stopped at a "
              "newline, a sentence's period, EOS or the token cap) contains the new object (Eff., Gen.) or the "
              "neighborhood answer (Spe.); Loc.: neighborhood answers unchanged from the unedited model's. General: mean headline metric of the GLUE-style tasks. "
              "WSE: relative weight shift error, mean over layers, of the last diagnosed round. "
              "Edit time: the rounds' editing time (evaluations excluded)."]
    for rec in records:
        refused = [h["round"] for h in rec.get("health") or [] if h["refused"]]
        if refused:
            lines.append(f"{_label(rec)}: health gate refused and undid round(s) {', '.join(map(str, refused))} "
                         f"({sum(min(rec['edits_per_round'], rec['num_edits'] - r * rec['edits_per_round']) for r in refused)} "
                         "edits; still evaluated, as failures where the model does not know them).")
    kept = [rec for rec in records if rec.get("from_csv")]
    if kept:
        lines.append("Reported from the rows of an earlier `sequence.csv` (no run record; edit time unknown): "
                     + ", ".join(f"{rec['method']} {rec['strategy']}" for rec in kept) + ".")
    return "\n".join(lines)


def csv_runs(path: Path, keys: list[str], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs named by ``keys`` (``method_strategy``) that have rows in the CSV at ``path`` but no
    record, as records that carry those rows (``csv_rows``). A CSV holds no edit time and no target
    site, so ``edit_seconds`` is ``None`` and the run is reported at the default site."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    have = {run_key(f"{r['method']}:{r['strategy']}") for r in records}
    kept = []
    for key in keys:
        if key in have:
            continue
        mine = [{**r, "edits_per_round": int(r["edits_per_round"]), "edits": int(r["edits"]),
                 "round": int(r["round"]), "value": float(r["value"])}
                for r in rows if run_key(f"{r['method']}:{r['strategy']}") == key]
        if mine:
            kept.append({"run": key, "method": mine[0]["method"], "strategy": mine[0]["strategy"],
                         "dataset": mine[0]["dataset"], "edits_per_round": mine[0]["edits_per_round"],
                         "num_edits": max(r["edits"] for r in mine), "edit_seconds": None,
                         "from_csv": str(path), "csv_rows": mine})
    return kept


def assemble(out_dir: Path, title: str, keep_csv_runs: list[str] = ()) -> dict[str, Any]:
    """CSV, PNG and markdown table from ``out_dir/runs/*.json`` (and, for the runs named in
    ``keep_csv_runs`` that have no record there, from their rows in the existing ``sequence.csv``)."""
    records = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    records += csv_runs(out_dir / "sequence.csv", list(keep_csv_runs), records)
    order = {"distribute": 0, "boundary": 1}
    records.sort(key=lambda r: (r["method"], order.get(r["strategy"], 2), r["strategy"]))
    if not records:
        return {"records": [], "rows": []}
    rows = write_csv(records, out_dir / "sequence.csv")
    plot_curves(records, rows, out_dir / "curves.png", title)
    write_retentions(records, out_dir)
    table = markdown_table(records, title)
    (out_dir / "table.md").write_text(table + "\n")
    print(table)
    return {"records": records, "rows": rows, "table": table}


RETENTION_METRICS = ("efficacy", "efficacy_wild")


def write_retentions(records: list[dict[str, Any]], out_dir: Path) -> None:
    """The retention matrix of each run and metric of :data:`RETENTION_METRICS` whose
    evaluations kept per-record values."""
    from blueedit.evaluation.retention import retention_from_history, write_retention

    for rec in records:
        for metric in RETENTION_METRICS:
            r = retention_from_history(rec.get("sequence") or [], rec["edits_per_round"], metric)
            if r is not None:
                write_retention(r, out_dir, f"retention_{rec['run']}_{metric}",
                                f"{_label(rec)}: {metric} of each round's edits ({rec['dataset']})")


def check_inputs(args: Namespace, data_dir: Path) -> None:
    """Bad options and records fail here, before any model is loaded."""
    from blueedit.editing.editor import METHODS, STRATEGIES

    for spec in args.runs:
        method, strategy = spec.split(":")
        names = sorted(set(METHODS) | set(C.method_presets()))
        if method not in names or strategy not in STRATEGIES:
            raise SystemExit(f"--runs {spec!r}: METHOD must be one of {', '.join(names)} and STRATEGY one of "
                             f"{', '.join(STRATEGIES)}")
    config = Path(args.config) if Path(args.config).is_absolute() else C.REPO / args.config
    if not config.is_file():
        raise SystemExit(f"--config {args.config!r}: no such file")
    try:
        source = dataset_source(args.dataset, data_dir, Path(args.workdir or DEFAULT_WORKDIR).expanduser() / args.name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--dataset {args.dataset!r}: {e}") from e
    C.require_records(source, args.dataset, args.num_edits, data_dir,
                      "counterfact_eval 249, zsre_eval 500; counterfact-easyedit has 10,000; sets of one format "
                      "can be joined with '+', e.g. zsre_eval+zsre_dev")
    args.dataset_source = source


def dataset_source(dataset: str, data_dir: Path, work_root: Path) -> str:
    """``dataset`` itself, or for ``A+B+...`` (sets of one record format, joined in that order) the
    path of a file in ``work_root`` that holds their records."""
    if "+" not in dataset:
        return dataset
    from blueedit.data.formats import KNOWN_DATASETS, data_file, detect_format, read_records

    records: list[Any] = []
    formats = set()
    for part in dataset.split("+"):
        path = data_file(data_dir, KNOWN_DATASETS[part], f"dataset {part!r}") if part in KNOWN_DATASETS else Path(part)
        if not path.is_file():
            raise FileNotFoundError(f"{part!r} is neither a file nor one of {', '.join(KNOWN_DATASETS)}")
        part_records = read_records(path)
        if part_records:
            formats.add(detect_format(part_records[0]))
        records += part_records
    if len(formats) > 1:
        raise ValueError(f"the joined sets have different record formats ({', '.join(sorted(formats))})")
    work_root.mkdir(parents=True, exist_ok=True)
    out = work_root / "dataset.json"
    text = json.dumps(records)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return str(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    invocation = C.RunRecord("sequence", argv)
    args = parse_args(argv)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    if not args.report_only:
        check_inputs(args, data_dir)
    work_root = Path(args.workdir or DEFAULT_WORKDIR).expanduser() / args.name
    out_dir = Path(args.out) / args.name if args.out else None
    title = (f"{args.name}: {Path(args.dataset).name}, {args.num_edits} edits, {args.edits_per_round} per round, "
             f"config {args.config}")
    finished, pending = [], []
    if not args.report_only:
        for spec in args.runs:
            key = run_key(spec)
            done_path = out_dir / "runs" / f"{key}.json" if out_dir else None
            if (done_path is not None and done_path.is_file() and not args.restart
                    and not json.loads(done_path.read_text()).get("partial")):
                print(f"[sequence] {key}: finished ({done_path}), skipped", flush=True)
                finished.append(key)
                continue
            record = run_one(args, spec, work_root, data_dir)
            gc.collect()  # the run's model and Trainer are garbage now
            if record is None:
                pending.append(key)
                continue
            finished.append(key)
            if done_path is not None:
                done_path.parent.mkdir(parents=True, exist_ok=True)
                done_path.write_text(json.dumps(record, indent=1, default=str))
    result: dict[str, Any] = {"finished": finished, "pending": pending, "out_dir": str(out_dir) if out_dir else None,
                              "work_root": str(work_root)}
    if args.report_only and args.report_partial and out_dir is not None:
        for spec in args.runs:
            done_path = out_dir / "runs" / f"{run_key(spec)}.json"
            if done_path.is_file() and not json.loads(done_path.read_text()).get("partial"):
                continue
            record = partial_record(args, spec, work_root / run_key(spec))
            if record is not None:
                done_path.parent.mkdir(parents=True, exist_ok=True)
                done_path.write_text(json.dumps(record, indent=1, default=str))
                print(f"[sequence] {run_key(spec)}: partial, {record['num_edits']} of {args.num_edits} edits", flush=True)
    if out_dir is not None and (out_dir / "runs").is_dir():
        keep = [run_key(spec) for spec in args.runs] if args.report_only and args.keep_csv_runs else []
        result.update(assemble(out_dir, title, keep))
        # a report alone keeps naming the commands that ran the runs (each run record holds its own)
        ran = sorted({json.loads(f.read_text()).get("command") or "" for f in (out_dir / "runs").glob("*.json")} - {""})
        invocation.write(out_dir, runs_finished=finished, runs_pending=pending, report_only=bool(args.report_only),
                         **({"commands": ran} if args.report_only else {}))
    return result


if __name__ == "__main__":
    main()
