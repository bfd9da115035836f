"""The retention matrix of a sequential run: what the model still holds of each round's edits.

A sequential run is evaluated at times ``t`` (after round ``t``, on every record edited so far).
With ``s_t(i)`` the success of record ``i`` at time ``t`` (a per-record value in percent, e.g.
``efficacy`` or ``efficacy_wild``) and ``o(i)`` the round that edited record ``i``:

    R[t, j] = mean_{i : o(i) = j} s_t(i)          for every round of origin j <= t

(rows: evaluation times, columns: rounds of origin; a record without a value at ``t`` does not
count, and ``R[t, j]`` is undefined, NaN, when no record of round ``j`` was evaluated at ``t``).
The diagonal is how well a round's edits hold right after it, a column how they fade. The
forgetting curve pools the cells of one age ``a = t - j`` (in rounds), weighting each by its
number of records:

    F(a) = Σ_{t - j = a} n[t, j] R[t, j] / Σ_{t - j = a} n[t, j]

Pure functions: :func:`retention_matrix`, :func:`forgetting_curve`; :func:`write_retention`
writes the CSVs and the heat map with the curve.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Retention", "retention_matrix", "forgetting_curve", "retention_from_history", "write_retention"]


@dataclass
class Retention:
    """``values[a][b]`` = ``R[eval_rounds[a], origin_rounds[b]]`` (NaN where undefined) over
    ``counts[a][b]`` records."""

    eval_rounds: list[int]
    origin_rounds: list[int]
    values: list[list[float]]
    counts: list[list[int]]


def retention_matrix(evaluations: Sequence[tuple[int, Sequence[float | None]]], origin: Sequence[int]) -> Retention:
    """``R`` from ``evaluations``: per evaluation ``(t, s_t)``, with ``s_t[i]`` the value of record
    ``i`` (records in editing order; ``s_t`` may be shorter than ``origin``: the records edited
    so far; ``None`` or NaN: no value) and ``origin[i]`` the round that edited record ``i``."""
    origins = sorted(set(origin))
    col = {j: b for b, j in enumerate(origins)}
    rows, counts, times = [], [], []
    for t, values in evaluations:
        if len(values) > len(origin):
            raise ValueError(f"evaluation after round {t} has {len(values)} records but only {len(origin)} "
                             "have a round of origin")
        sums, ns = [0.0] * len(origins), [0] * len(origins)
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            sums[col[origin[i]]] += float(v)
            ns[col[origin[i]]] += 1
        times.append(int(t))
        rows.append([s / n if n else math.nan for s, n in zip(sums, ns)])
        counts.append(ns)
    return Retention(times, origins, rows, counts)


def forgetting_curve(r: Retention) -> list[tuple[int, float, int]]:
    """``(age, F(age), records)`` for every age ``t - j >= 0`` that has a defined cell, by age."""
    pooled: dict[int, list[float]] = {}
    for t, row, ns in zip(r.eval_rounds, r.values, r.counts):
        for j, v, n in zip(r.origin_rounds, row, ns):
            if n and t >= j:
                acc = pooled.setdefault(t - j, [0.0, 0])
                acc[0] += n * v
                acc[1] += n
    return [(age, s / n, int(n)) for age, (s, n) in sorted(pooled.items())]


def retention_from_history(history: list[dict], edits_per_round: int, metric: str,
                           first_round: int = 0) -> Retention | None:
    """``R`` of ``metric`` from a :class:`~blueedit.callbacks.sequence.SequenceEvaluation` history
    (entries after editing began; record ``i`` was edited in round ``first_round + i //
    edits_per_round``); ``None`` when no entry has per-record values of ``metric``."""
    entries = [h for h in history if h.get("round", -1) >= 0 and h.get("records")]
    if not any(metric in rec for h in entries for rec in h["records"]):
        return None
    n = max(len(h["records"]) for h in entries)
    origin = [first_round + i // edits_per_round for i in range(n)]
    return retention_matrix([(h["round"], [rec.get(metric) for rec in h["records"]]) for h in entries], origin)


def write_retention(r: Retention, out_dir: str | Path, stem: str, title: str) -> list[Path]:
    """``<stem>.csv`` (one row per cell: evaluation round, round of origin, age, value, records),
    ``<stem>_forgetting.csv`` (age, value, records) and ``<stem>.png`` (heat map and forgetting
    curve) in ``out_dir``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = out / f"{stem}.csv"
    with cells.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["eval_round", "origin_round", "age", "value", "records"])
        for t, row, ns in zip(r.eval_rounds, r.values, r.counts):
            for j, v, n in zip(r.origin_rounds, row, ns):
                if n:
                    w.writerow([t, j, t - j, f"{v:.4f}", n])
    curve = forgetting_curve(r)
    forgetting = out / f"{stem}_forgetting.csv"
    with forgetting.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "value", "records"])
        w.writerows([[a, f"{v:.4f}", n] for a, v, n in curve])

    fig = Figure(figsize=(10, 4))
    ax, ax2 = fig.subplots(1, 2)
    im = ax.imshow(r.values, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="upper")
    ax.set_xticks(range(len(r.origin_rounds)), [str(j) for j in r.origin_rounds])
    ax.set_yticks(range(len(r.eval_rounds)), [str(t) for t in r.eval_rounds])
    ax.set_xlabel("round of origin")
    ax.set_ylabel("evaluated after round")
    if len(r.eval_rounds) * len(r.origin_rounds) <= 144:
        for a, row in enumerate(r.values):
            for b, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(b, a, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    fig.colorbar(im, ax=ax, label="success (%)")
    ax2.plot([a for a, _, _ in curve], [v for _, v, _ in curve], marker="o")
    ax2.set_xlabel("age of the edit (rounds since it was made)")
    ax2.set_ylabel("success (%)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=100)
    return [cells, forgetting, png]
