"""Claim (b): the weight shift error against layer distance, batch size and sequence length.

The weight shift error of a written layer ``l`` (``docs/algorithms.md``, section 6; the
``WeightShiftError`` callback) compares the update ``Δ^l`` the editor writes with the update
``Δ^{l*}`` it would write with a target optimized at ``l`` itself; ``relative`` is
``‖Δ^{l*} − Δ^l‖_F / ‖Δ^{l*}‖_F``. Under ``distribute`` the target is optimized once, at the last
critical layer ``L``, so the error is expected to grow with the distance ``L − l``; under BLUE
(``boundary``) each written layer has its own target, so the error is zero up to round-off.

The figures plot ``--measure``: ``frobenius`` (default), the paper's ``e^l = ‖Δ^{l*} − Δ^l‖_F``, whose
bound grows with ``L − l``; or ``relative``. The relative error is not comparable across layers:
at ``l = L`` the ideal update ``Δ^{L*}`` is small (the lower layers, already written, did most of
the work), so a small error over a small norm can exceed the errors of the lower layers.

This script

1. runs :mod:`blueedit.bench.sequence` (unless ``--figures-only``; the runs are resumable and skipped
   when finished, like every ``sequence`` run), with no diagnostics but the weight shift error:

   - per batch size E of ``--batch-sizes``, ``<name>_e<E>``: ``--batch-rounds`` rounds of E edits
     (default 1), the first round diagnosed;
   - ``<name>_seq``: ``--sequence-edits`` edits in rounds of ``--sequence-batch-size``, a round
     diagnosed every ``--sequence-wse-every`` edits;

2. reads the ``WeightShiftError`` histories of those runs, and of the finished ``sequence``
   results named by ``--from`` (e.g. the long runs), and writes under ``--out``/``<name>``:

   - ``wse_vs_distance.png``: the error per written layer against ``L − l`` (mean over the
     diagnosed rounds of the runs at ``--distance-batch-size``), one line per method × strategy;
   - ``wse_vs_batch_size.png``: the error (mean over layers) of the first diagnosed round
     (round 0, the unedited model) against the batch size E;
   - ``wse_vs_sequence.png``: the error (mean over layers) against the number of edits
     made before the diagnosed round, one line per method × strategy × E;
   - ``weight_shift.csv``: every point of the three figures.

A diagnosed round costs one extra target optimization per edited layer: about 6× a ``distribute``
round and 2× a ``boundary`` round with five critical layers.

Example::

    python -m blueedit.bench.weight_shift --name wse_counterfact --batch-sizes 10 50 100 \\
        --sequence-batch-size 10 --sequence-edits 200 --sequence-wse-every 50 --from counterfact_memit
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from blueedit.bench import harness as C

MEASURES = ("frobenius", "relative")  # what the figures can plot (the paper's error, or it over ‖Δ*‖_F)


def parse_args(argv: list[str] | None) -> tuple[Namespace, list[str]]:
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--name", default="weight_shift", help="figures under <out>/<name>; runs named <name>_e<E>")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[10, 50, 100])
    p.add_argument("--batch-rounds", type=int, default=1, help="rounds per batch-size run (the first is diagnosed)")
    p.add_argument("--sequence-batch-size", type=int, default=10, help="E of the sequence-length run (0: no run)")
    p.add_argument("--sequence-edits", type=int, default=200)
    p.add_argument("--sequence-wse-every", type=int, default=50)
    p.add_argument("--distance-batch-size", type=int, default=None,
                   help="the E whose runs give the distance figure (default: the largest of --batch-sizes)")
    p.add_argument("--from", dest="sources", nargs="*", default=[],
                   help="more finished sequence result names whose weight shift histories are plotted")
    p.add_argument("--measure", choices=MEASURES, default="frobenius",
                   help="what the figures plot: ‖Δ* − Δ‖_F (the paper's) or it over ‖Δ*‖_F")
    p.add_argument("--figures-only", action="store_true", help="do not run anything; plot what exists")
    p.add_argument("--out", default=str(C.RESULTS))
    own, rest = C.split_options(list(sys.argv[1:] if argv is None else argv), p)
    return p.parse_args(own), rest


def run_all(args: Namespace, rest: list[str]) -> list[str]:
    """The batch-size runs and the sequence-length run; returns their result names."""
    from blueedit.bench import sequence as seq

    jobs = [(f"{args.name}_e{E}", E, E * args.batch_rounds, E * args.batch_rounds) for E in args.batch_sizes]
    if args.sequence_batch_size > 0:
        jobs.append((f"{args.name}_seq", args.sequence_batch_size, args.sequence_edits, args.sequence_wse_every))
    for name, E, N, wse_every in jobs:
        if not args.figures_only:
            seq.main(["--name", name, "--num-edits", str(N), "--edits-per-round", str(E), "--eval-every", str(N),
                      "--general-every", "0", "--drift-every", "0", "--wse-every", str(wse_every),
                      "--out", args.out, *rest])
    return [job[0] for job in jobs]


def load_records(out_root: Path, names: list[str]) -> list[dict[str, Any]]:
    records = []
    for name in names:
        runs = out_root / name / "runs"
        for p in sorted(runs.glob("*.json")) if runs.is_dir() else []:
            rec = json.loads(p.read_text())
            if rec.get("weight_shift"):
                records.append(rec)
    return records


def points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run × diagnosed round × layer: relative error, distance ``L − l`` (``L`` the
    last critical layer) and the edits made before the round."""
    rows = []
    for rec in records:
        last = max(rec["layers"])
        for h in rec["weight_shift"]:
            rel = h["metrics"].get("relative")
            if rel is None or (isinstance(rel, float) and math.isnan(rel)):
                continue
            rows.append({"source": rec["name"], "method": rec["method"], "strategy": rec["strategy"],
                         "edits_per_round": rec["edits_per_round"], "round": h["round"],
                         "edits_before": h["round"] * rec["edits_per_round"], "layer": h["layer"],
                         "distance": last - h["layer"], "relative": float(rel),
                         "frobenius": float(h["metrics"].get("frobenius", float("nan"))),
                         "cosine": float(h["metrics"].get("cosine", float("nan")))})
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _label(method: str, strategy: str) -> str:
    name = "AlphaEdit" if method == "alphaedit" else method.upper()
    return name + (" + BLUE" if strategy == "boundary" else "")


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figures(rows: list[dict[str, Any]], out_dir: Path, distance_E: int | None,
            measure: str = "frobenius") -> list[dict[str, Any]]:
    """The three figures of ``measure`` (``frobenius`` or ``relative``) and their points (returned,
    and written as ``weight_shift.csv``)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be 'frobenius' or 'relative', got {measure!r}")
    ylabel = "weight shift error ‖Δ* − Δ‖_F" if measure == "frobenius" else "weight shift error (relative)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    series = sorted({(r["method"], r["strategy"]) for r in rows}, key=lambda s: (s[0], s[1] != "distribute"))
    fig_rows: list[dict[str, Any]] = []

    def style(strategy: str) -> str:
        return "-" if strategy == "boundary" else "--"

    # 1. against layer distance
    Es = sorted({r["edits_per_round"] for r in rows})
    E_d = distance_E if distance_E in Es else (max(Es) if Es else None)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, s in series:
        sel = [r for r in rows if (r["method"], r["strategy"]) == (m, s) and r["edits_per_round"] == E_d]
        ds = sorted({r["distance"] for r in sel})
        ys = [_mean([r[measure] for r in sel if r["distance"] == d]) for d in ds]
        for d, y in zip(ds, ys):
            fig_rows.append({"figure": "distance", "method": m, "strategy": s, "edits_per_round": E_d, "x": d, "y": y})
        if ds:
            ax.plot(ds, ys, style(s), marker="o", label=_label(m, s))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, ax, out_dir / "wse_vs_distance.png", "layer distance L − l (L: last critical layer)", ylabel,
          f"Weight shift error vs layer distance ({E_d} edits / round)")

    # 2. against batch size: round 0 (the unedited model), mean over layers
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, s in series:
        xs, ys = [], []
        for E in Es:
            sel = [r[measure] for r in rows
                   if (r["method"], r["strategy"]) == (m, s) and r["edits_per_round"] == E and r["round"] == 0]
            if sel:
                xs.append(E)
                ys.append(_mean(sel))
                fig_rows.append({"figure": "batch_size", "method": m, "strategy": s, "edits_per_round": E,
                                 "x": E, "y": ys[-1]})
        if xs:
            ax.plot(xs, ys, style(s), marker="o", label=_label(m, s))
    if Es:
        ax.set_xticks(Es)
    _save(fig, ax, out_dir / "wse_vs_batch_size.png", "edits per round (batch size)", ylabel + ", mean over layers",
          "Weight shift error vs batch size (first round)")

    # 3. against sequence length: edits before the diagnosed round, mean over layers
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, s in series:
        for E in Es:
            sel = [r for r in rows if (r["method"], r["strategy"]) == (m, s) and r["edits_per_round"] == E]
            xs = sorted({r["edits_before"] for r in sel})
            # a long run may hold the same (E, edits) point as a batch-size run: average them
            ys = [_mean([r[measure] for r in sel if r["edits_before"] == x]) for x in xs]
            for x, y in zip(xs, ys):
                fig_rows.append({"figure": "sequence", "method": m, "strategy": s, "edits_per_round": E,
                                 "x": x, "y": y})
            if len(xs) > 0:
                ax.plot(xs, ys, style(s), marker="o", label=f"{_label(m, s)}, {E} / round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, ax, out_dir / "wse_vs_sequence.png", "edits made before the diagnosed round", ylabel + ", mean over layers",
          "Weight shift error vs sequence length", legend_size=7)

    for r in fig_rows:
        r["measure"] = measure
    with (out_dir / "weight_shift.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["figure", "measure", "method", "strategy", "edits_per_round", "x", "y"])
        w.writeheader()
        w.writerows(fig_rows)
    return fig_rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    record = C.RunRecord("weight_shift", argv)
    args, rest = parse_args(argv)
    names = run_all(args, rest)
    out_root = Path(args.out)
    records = load_records(out_root, names + list(args.sources))
    rows = points(records)
    if not rows:
        print("[weight_shift] no finished run with a weight shift history yet", flush=True)
        return {"rows": [], "figure_rows": []}
    distance_E = args.distance_batch_size or max(args.batch_sizes or [args.sequence_batch_size])
    fig_rows = figures(rows, out_root / args.name, distance_E, args.measure)
    record.write(out_root / args.name, sources=names + list(args.sources))
    print(f"[weight_shift] {len(rows)} diagnosed layer writes from {len(records)} runs -> {out_root / args.name}")
    return {"rows": rows, "figure_rows": fig_rows}


if __name__ == "__main__":
    main()
