"""Choose a model's critical layers: MEMIT on a few candidate windows of consecutive MLP layers.

For every window (``--windows 2-6 4-8``, or ``--starts 2,4,6`` with ``--window-size 5``) the same
``--num-edits`` records of ``--dataset`` (default ``counterfact_dev``, never the evaluation split) are
edited in rounds of ``--edits-per-round`` with blueedit's :class:`~blueedit.editing.editor.Editor`
(``--method``/``--strategy``, λ ``--lam``), then efficacy, generalization and specificity of those
records are measured and the edited ``W_out`` restored. The model is loaded once and ``C_0`` of
every layer of every window is collected in one pass (and cached, shared with ``blueedit fit``
when the statistics settings match the config's).

The chosen window is the one with the highest mean of the three metrics (ties: the earlier window).
Written: ``<out>.csv`` (one row per window, and the pre-edit row) and ``<out>.md`` (the table, the
choice and the command).

    python -m blueedit.bench.layer_sweep --model gemma3-270m --lam 2000 --starts 2,4,6 \\
        --out benchmarks/results/gemma3_layer_sweep
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from blueedit.bench import harness as C
from blueedit.bench import quality as Q

METRICS = Q.METRICS


SHORTHANDS = C.shorthands(
    "--method", "--strategy", "--lam", "--v-lr", "--steps", "--stats-samples", "--stats-max-length",
    "--stats-corpus")


def build_parser():
    p = C.benchmark_parser(__doc__, shorthands=SHORTHANDS, stats_defaults=Q.STATS_DEFAULTS)
    C.add_model_options(p)
    p.add_argument("--dataset", default="counterfact_dev")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--edits-per-round", type=int, default=10)
    p.add_argument("--windows", nargs="*", default=None, metavar="FIRST-LAST",
                   help="candidate windows of consecutive layers, e.g. 2-6 4-8 (overrides --starts)")
    p.add_argument("--starts", default="2,4,6", help="first layer of each candidate window")
    p.add_argument("--window-size", type=int, default=5)
    p.add_argument("--out", default=str(C.RESULTS / "layer_sweep"), help="writes <out>.csv and <out>.md ('' to skip)")
    return p


def candidate_windows(args) -> list[list[int]]:
    """The windows to try, each a list of consecutive layers."""
    if args.windows:
        out = []
        for w in args.windows:
            try:
                first, last = (int(x) for x in w.split("-"))
            except ValueError:
                raise SystemExit(f"--windows {w!r}: expected FIRST-LAST, e.g. 2-6") from None
            if last < first:
                raise SystemExit(f"--windows {w!r}: the last layer comes before the first")
            out.append(list(range(first, last + 1)))
        return out
    if args.window_size < 1:
        raise SystemExit(f"--window-size must be positive, got {args.window_size}")
    return [list(range(s, s + args.window_size)) for s in C.parse_int_list(args.starts)]


def window_label(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}"


def choose(runs: list[dict]) -> dict | None:
    """The run with the highest mean score (the earliest on ties); ``None`` when every run failed."""
    ok = [r for r in runs if not math.isnan(r["score"])]
    return max(ok, key=lambda r: r["score"]) if ok else None  # max keeps the first of equal scores


def markdown(results: dict) -> str:
    f2 = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = [f"{results['model']}, {results['dataset']}, {results['num_edits']} edits in rounds of "
             f"{results['edits_per_round']}, {results['method']} ({results['strategy']}), λ {results['lam']:g}, "
             f"C_0 from {results['stats_samples']} {results['stats_corpus']} texts of ≤ {results['stats_max_length']} tokens",
             "", "| layers | " + " | ".join(METRICS) + " | mean | edit seconds | edit CPU seconds |",
             "|---|" + "---:|" * (len(METRICS) + 3)]
    pre = results["pre_edit"]
    lines.append("| pre-edit | " + " | ".join(f2(pre[k]) for k in METRICS) + f" | {f2(pre['score'])} | - | - |")
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['window']} | " + " | ".join("-" for _ in METRICS) + f" | - | failed: {r['error']} | - |")
            continue
        lines.append(f"| {r['window']} | " + " | ".join(f2(r[k]) for k in METRICS)
                     + f" | {f2(r['score'])} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    best = results.get("chosen")
    lines += ["", f"Chosen (highest mean of efficacy, generalization, specificity): layers {best['window']} "
              f"({best['layers']})" if best else "No window succeeded.",
              "", f"Statistics: {results['stats_seconds']:.0f} s; total {results['total_seconds']:.0f} s wall, "
              f"{results['total_cpu_seconds']:.0f} s CPU ({results['threads']} thread(s)); {results['device']}; "
              + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
              "", "Command:", "", "```bash", results["command"], "```"]
    return "\n".join(lines)


def write_csv(path: Path, results: dict) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["window", "layers", *METRICS, "mean", "edit_seconds", "edit_cpu_seconds", "error"])
        pre = results["pre_edit"]
        w.writerow(["pre-edit", "", *(f"{pre[k]:.4f}" for k in METRICS), f"{pre['score']:.4f}", "", "", ""])
        for r in results["runs"]:
            w.writerow([r["window"], " ".join(map(str, r["layers"])),
                        *(f"{r[k]:.4f}" for k in METRICS), f"{r['score']:.4f}",
                        "" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                        "" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.1f}", r.get("error", "")])


def finish(results: dict, record: C.RunRecord, partial: bool = False) -> None:
    """The run record (totals since the start: wall, CPU), the chosen window and the markdown table."""
    results["run"] = record.as_dict()
    results["total_seconds"] = results["run"]["wall_seconds"]
    results["total_cpu_seconds"] = results["run"]["cpu_seconds"]
    best = choose(results["runs"])
    results["chosen"] = {"window": best["window"], "layers": best["layers"], "score": best["score"]} if best else None
    results["partial"] = partial
    results["table"] = markdown(results) + ("\n\nPARTIAL: not every window has run yet." if partial else "")


def write_results(out: Path, results: dict) -> None:
    """``<out>.csv``, ``<out>.md`` and ``<out>.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), results)
    out.with_suffix(".md").write_text(results["table"] + "\n")
    out.with_suffix(".json").write_text(json.dumps({k: v for k, v in results.items() if k != "table"},
                                                   indent=1, default=str))


def main(argv: list[str] | None = None, *, model=None, tokenizer=None, requests=None, texts=None) -> dict:
    """Run the sweep and return the results dict. ``model``/``tokenizer`` (edited in place, restored
    afterwards), ``requests`` and ``texts`` (the statistics corpus) replace the loaded ones (tests)."""
    from dataclasses import replace

    record = C.RunRecord("layer_sweep", argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    base, stats = C.benchmark_configs(parser, args)
    args.fluency = False  # read by quality.run_one
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = candidate_windows(args)
    try:  # all options checked before any slow work
        hps = [replace(base, layers=layers) for layers in windows]  # validated on creation
    except ValueError as e:
        raise SystemExit(str(e)) from e
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    if requests is None:
        from blueedit.data.formats import load_requests

        requests = load_requests(args.dataset, data_dir=data_dir, num_edits=args.num_edits)
    requests = list(requests)[: args.num_edits]

    all_layers = sorted({layer for hp in hps for layer in hp.edited_layers})
    bench = C.prepare_edit_bench(args, stats, all_layers, data_dir=data_dir, model=model, tokenizer=tokenizer,
                                 texts=texts)
    model, tokenizer = bench.model, bench.tokenizer
    results: dict = {
        "command": record.command, "versions": C.versions(),
        "device": C.device_description(args.device), "threads": torch.get_num_threads(),
        "model": args.model if bench.model_id.startswith(args.model.split("/")[-1]) else bench.model_id,
        "dataset": args.dataset, "num_edits": len(requests), "edits_per_round": args.edits_per_round,
        "method": base.method, "strategy": base.strategy, "lam": base.mom2_update_weight, "v_lr": base.target.v_lr,
        "steps": base.target.v_num_grad_steps, "stats_samples": stats.num_samples, "stats_max_length": stats.max_length,
        "stats_corpus": stats.corpus if texts is None else "given", "stats_seconds": bench.stats_seconds,
        "runs": [],
    }
    pre = Q.evaluate(model, tokenizer, requests, args, [])
    pre["score"] = sum(pre[k] for k in METRICS) / len(METRICS)
    results["pre_edit"] = pre
    print("pre-edit: " + ", ".join(f"{k} {pre[k]:.2f}" for k in METRICS), flush=True)
    if args.out:
        finish(results, record, partial=True)
        write_results(Path(args.out), results)
    with bench.restored():
        for layers, hp in zip(windows, hps):
            bench.restore()
            with C.timed(args.device) as t_run:
                try:
                    run = Q.run_one(args, hp, bench, requests, [])
                except Exception as e:  # one failed window should not lose the others
                    run = {"error": f"{type(e).__name__}: {e}", **{k: float("nan") for k in METRICS},
                           "score": float("nan"), "seconds": None}
            run.update(window=window_label(layers), layers=layers,
                       cpu_seconds=None if "error" in run else t_run["cpu_seconds"])
            results["runs"].append(run)
            if args.out and len(results["runs"]) < len(windows):  # partial results, in case it is stopped
                finish(results, record, partial=True)
                write_results(Path(args.out), results)
            print(f"layers {run['window']}: " + (run["error"] if "error" in run else
                  ", ".join(f"{k} {run[k]:.2f}" for k in METRICS) + f", mean {run['score']:.2f}, "
                  f"{run['seconds']:.0f} s"), flush=True)
    finish(results, record)
    if args.out:
        write_results(Path(args.out), results)
    print()
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
