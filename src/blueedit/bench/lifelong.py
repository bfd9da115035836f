"""Lifelong editing (one edit per round, T edits): WISE against MEMIT / AlphaEdit (+ BLUE).

For each ``NAME=CONFIG[,CONFIG...]`` of ``--runs`` this runs ``blueedit fit`` (the CLI, in this
process; several configs are combined in order, e.g. a method config and ``configs/blue.yaml``) with
``data.dataset=--dataset``, ``data.num_edits=T``, ``data.edits_per_round=1`` and evaluation on the
edited records, then reads the run's ``metrics.json``. The table has, per run, reliability (efficacy:
the edit prompt), generalization (the paraphrase), locality (agreement with the pre-edit model on
the unrelated prompts, docs/algorithms.md §8) and specificity, all after the T-th edit, and the
time per edit (wall seconds inside the editing rounds, and CPU seconds of the whole run / T).

Written under ``--out``: ``lifelong_T<T>.json`` (every run's metrics and timings, the command),
``lifelong_T<T>.md`` (the table) and, per row, ``lifelong_T<T>/<name>.json``: the run's evaluation
record with its per-record outcomes before and after editing, so that two rows compare record by
record (``python -m blueedit.bench.paired --arms lifelong_T<T>/MEMIT.json:post
lifelong_T<T>/MEMIT_plus_BLUE.json:post --out ...``). Rows run in separate processes (one per core) are joined into one
table by ``--combine A/lifelong_T<T>.json B/lifelong_T<T>.json ... --out DIR``, which keeps every
file's command and refuses files of different T or dataset, or two rows of the same name (with
``--replace``, a later file's row replaces the earlier one: a rerun of that row).

Resumable: each run checkpoints every ``--checkpoint-every`` rounds (``last.ckpt`` under
``--workdir``/``<name>_T<T>``), and the same command continues an interrupted run from it (the
editor state, the round loader and the per-round reports are restored). The CPU seconds of a
resumed run add up the processes that ran to the end of their part; a killed process's time is
lost, and then ``CPU s / edit`` is a lower bound, marked ``≥`` in the table. The wall seconds
inside the editing rounds are complete (they travel in the checkpoint).

Example (the README's table)::

    python -m blueedit.bench.lifelong --num-edits 100 --runs \\
        WISE=configs/smollm2-135m/wise.yaml MEMIT=configs/smollm2-135m/memit.yaml \\
        "MEMIT + BLUE=configs/smollm2-135m/memit.yaml,configs/blue.yaml" \\
        "AlphaEdit + BLUE=configs/smollm2-135m/alphaedit.yaml,configs/blue.yaml" --bf16-locate-then-edit
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from jsonargparse import Namespace

from blueedit.bench import harness as C

COLUMNS = ("efficacy", "generalization", "locality", "specificity")


def slug(name: str) -> str:
    """A row name as a file name: ``MEMIT + BLUE`` -> ``MEMIT_plus_BLUE``."""
    return name.replace(" ", "_").replace("+", "plus")


def run_one(name: str, config: str, args, workdir: Path, out: Path) -> dict:
    from blueedit.cli import run_cli

    root = workdir / f"{slug(name)}_T{args.num_edits}"
    root.mkdir(parents=True, exist_ok=True)
    checkpoints = root / "checkpoints"
    argv = ["fit"] + [arg for path in config.split(",") for arg in ("--config", path)]
    if args.checkpoint_every > 0:
        generated = root / "lifelong.yaml"
        generated.write_text(json.dumps({"trainer": {"callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(checkpoints), "save_last": True, "save_top_k": 0,
                           "every_n_train_steps": args.checkpoint_every}}]}}, indent=1))  # JSON is YAML
        argv += ["--config", str(generated)]
    argv += ["--data.dataset", args.dataset, "--data.num_edits", str(args.num_edits),
             "--data.edits_per_round", "1", "--data.eval_dataset", "null", "--model.evaluate", "true",
             "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
             "--trainer.enable_checkpointing", str(args.checkpoint_every > 0).lower(),
             "--trainer.enable_progress_bar", "false"]
    method = _method_of(config)
    if args.bf16_locate_then_edit and method != "wise":
        argv += ["--model.editing.compute_dtype", "bfloat16"]
    argv += args.extra
    last = checkpoints / "last.ckpt"
    resumed = last.is_file()
    if resumed:
        argv += ["--ckpt_path", str(last)]
        print(f"{name}: resuming from {last}", flush=True)
    if args.stop_after_rounds is not None:
        argv += [f"--trainer.max_steps={args.stop_after_rounds}"]
    ledger = root / "process_seconds.json"  # CPU and wall seconds of the finished parts of this run
    spent = (json.loads(ledger.read_text()) if ledger.is_file() and resumed
             else {"cpu": 0.0, "wall": 0.0, "parts": 0, "started": 0})
    spent["started"] += 1  # a process killed before its end leaves started > parts
    ledger.write_text(json.dumps(spent))
    (root / "metrics.json").unlink(missing_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_cli(argv)
    spent.update(cpu=spent["cpu"] + time.process_time() - cpu0, wall=spent["wall"] + time.perf_counter() - wall0,
                 parts=spent["parts"] + 1)
    ledger.write_text(json.dumps(spent))
    summary = json.loads((root / "metrics.json").read_text())
    n = summary["num_edits"]
    if n < args.num_edits:  # stopped early (--stop-after-rounds): the same command continues it
        print(f"{name}: stopped after {n} of {args.num_edits} edits; run the same command to continue", flush=True)
        return None
    # the run's evaluation record, per-record outcomes included: the input of blueedit.bench.paired --arms
    outcomes = out / f"lifelong_T{args.num_edits}" / f"{slug(name)}.json"
    outcomes.parent.mkdir(parents=True, exist_ok=True)
    outcomes.write_text(json.dumps(summary, indent=1))
    return {
        "name": name, "config": config, "method": summary["method"], "strategy": summary["strategy"],
        "layers": summary["layers"], "num_edits": n, "argv": argv,
        "metrics": {k: v for k, v in summary["metrics"].items()},
        "edit_seconds_per_edit": summary["edit_seconds"] / n, "run_wall_seconds": spent["wall"],
        "run_cpu_seconds": spent["cpu"], "cpu_seconds_per_edit": spent["cpu"] / n, "processes": spent["parts"],
        "cpu_complete": spent["parts"] == spent["started"], "outcomes": outcomes.relative_to(out).as_posix(),
    }


def check_inputs(args: Namespace) -> None:
    """Bad options and too few records fail here, before any model is loaded."""
    for spec in args.runs:
        name, sep, config = spec.partition("=")
        if not sep or not name or not config:
            raise SystemExit(f"--runs {spec!r}: expected NAME=CONFIG[,CONFIG...]")
        for path in config.split(","):
            if not Path(path).is_file():
                raise SystemExit(f"--runs {spec!r}: no such config file {path!r}")
    if args.num_edits < 1:
        raise SystemExit(f"--num-edits {args.num_edits}: must be >= 1")
    C.require_records(args.dataset, args.dataset, args.num_edits, None, "zsre_eval has 500")


def _method_of(config: str) -> str:
    import yaml

    methods = [(yaml.safe_load(Path(path).read_text()) or {}).get("model", {}).get("editing", {}).get("method")
               for path in config.split(",")]
    return [m for m in methods if m][-1]


def table(results: list[dict], T: int, dataset: str) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"Lifelong editing on `{dataset}`, T = {T} edits, one per round; metrics after the last edit "
             "(pre-edit in parentheses).", "",
             "| method | layers | reliability | generalization | locality | specificity | s / edit (wall) | CPU s / edit |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["metrics"]
        cells = []
        for c in COLUMNS:
            v = m.get(c, {})
            pre = v.get("pre")
            cells.append(fmt(v.get("post")) + (f" ({pre:.1f})" if pre is not None else ""))
        bound = "" if r.get("cpu_complete", True) else "≥ "
        lines.append(f"| {r['name']} | {r['layers']} | " + " | ".join(cells)
                     + f" | {r['edit_seconds_per_edit']:.1f} | {bound}{r['cpu_seconds_per_edit']:.1f} |")
    return "\n".join(lines)


def combine(paths: list[str], out: Path, record: C.RunRecord | None = None, replace: bool = False) -> dict:
    """Join the rows of several ``lifelong_T<T>.json`` into ``out/lifelong_T<T>.{json,md}``.

    Every file must have the same T and dataset and the row names must be distinct, unless
    ``replace``: then a row of a later file takes the place of an earlier row of the same name (a
    rerun of that row). The joined payload lists each file's command (or commands, for an already
    joined file) under ``commands`` and the joining command's ``record`` under ``run``; each row's
    per-record outcomes (``outcomes``, beside its file) are copied to ``out``. Nothing is written
    when a check fails.
    """
    payloads = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--combine {path}: no such file")
        payloads.append(json.loads(Path(path).read_text()))
    first = payloads[0]
    for path, payload in zip(paths, payloads):
        for key in ("num_edits", "dataset"):
            if payload[key] != first[key]:
                raise SystemExit(f"--combine {path}: {key} {payload[key]!r} differs from "
                                 f"{first[key]!r} of {paths[0]}")
    rows, commands, sources = [], [], {}
    for path, payload in zip(paths, payloads):
        for row in payload["runs"]:
            same = [i for i, r in enumerate(rows) if r["name"] == row["name"]]
            if same and not replace:
                raise SystemExit(f"--combine {path}: a row named {row['name']!r} is already in an earlier file "
                                 "(--replace to take the later one)")
            if row.get("outcomes"):
                source = Path(path).parent / row["outcomes"]
                if not source.is_file():
                    raise SystemExit(f"--combine {path}: row {row['name']!r}: its outcomes {source} are missing")
                sources[row["name"]] = source
            elif row["name"] in sources:
                del sources[row["name"]]
            if same:
                rows[same[0]] = row
            else:
                rows.append(row)
        commands += payload.get("commands", [payload.get("command")])
    joined = {"commands": [c for c in commands if c], "dataset": first["dataset"],
              "num_edits": first["num_edits"], "versions": first["versions"], "device": first["device"],
              "runs": rows}
    if record is not None:
        joined["run"] = record.as_dict()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lifelong_T{first['num_edits']}"
    for row in rows:
        if row["name"] in sources:
            target = out / row["outcomes"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if sources[row["name"]].resolve() != target.resolve():
                target.write_bytes(sources[row["name"]].read_bytes())
    if record is not None and any(row["name"] in sources for row in rows):  # it names the command that wrote it
        record.write(out / f"lifelong_T{first['num_edits']}", shared=True)
    stem.with_suffix(".json").write_text(json.dumps(joined, indent=1))
    stem.with_suffix(".md").write_text(table(rows, first["num_edits"], first["dataset"]) + "\n\nCommands (one process each):\n\n"
                                       + "\n".join(f"- `{c}`" for c in joined["commands"]) + "\n")
    return joined


def main(argv: list[str] | None = None) -> None:
    record = C.RunRecord("lifelong", argv)
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", help="NAME=CONFIG[,CONFIG...], one per row (later configs override earlier ones)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="join the rows of these lifelong_T<T>.json files into --out (no run)")
    p.add_argument("--replace", action="store_true",
                   help="with --combine: a later file's row replaces an earlier row of the same name")
    p.add_argument("--dataset", default="zsre_eval")
    p.add_argument("--num-edits", type=int, default=100)
    p.add_argument("--bf16-locate-then-edit", action="store_true",
                   help="editing.compute_dtype bfloat16 for every run that is not WISE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="~/.cache/blueedit/lifelong", help="checkpoints and logs, outside the repo")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="rounds (edits) between checkpoints; 0: none (the run cannot be continued)")
    p.add_argument("--stop-after-rounds", type=int, default=None,
                   help="stop each run after this many rounds in total (a test of resuming)")
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument("extra", nargs="*", help="further CLI overrides for every run (after --)")
    args = p.parse_args(argv)
    if args.combine:
        if args.runs:
            p.error("--combine and --runs exclude each other")
        joined = combine(args.combine, Path(args.out), record, replace=args.replace)
        print(table(joined["runs"], joined["num_edits"], joined["dataset"]))
        return
    if not args.runs:
        p.error("--runs is required (or --combine)")
    check_inputs(args)
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lifelong_T{args.num_edits}"
    done = json.loads(stem.with_suffix(".json").read_text())["runs"] if stem.with_suffix(".json").is_file() else []
    results = [r for r in done if any(r["name"] == s.split("=", 1)[0] for s in args.runs)]
    for spec in args.runs:
        name, config = spec.split("=", 1)
        if any(r["name"] == name for r in results):
            print(f"{name}: already in {stem}.json, skipped")
            continue
        row = run_one(name, config, args, workdir, out)
        if row is None:
            continue
        results.append(row)
        order = [s.split("=", 1)[0] for s in args.runs]
        results.sort(key=lambda r: order.index(r["name"]))
        payload = {"command": record.command,
                   "dataset": args.dataset, "num_edits": args.num_edits, "versions": C.versions(),
                   "device": C.device_description("cpu"), "runs": results, "run": record.as_dict()}
        record.write(out / f"lifelong_T{args.num_edits}", shared=True)  # beside the row's outcomes
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        stem.with_suffix(".md").write_text(table(results, args.num_edits, args.dataset) + "\n\nCommand: `"
                                           + payload["command"] + "`\n")
        print(table(results, args.num_edits, args.dataset))


if __name__ == "__main__":
    main()
