"""Run reports: per-record results, a Markdown summary and plots of the diagnostic callbacks.

:func:`write_report` writes into the run directory

- ``records.jsonl``: one line per evaluated record, ``{"case_id", "pre": {...}, "post": {...}}``;
- ``metrics.md``: pre/post editing metrics, general capability (pre-edit and last evaluation),
  hidden-state drift and weight shift error summaries when the callbacks ran;
- ``metrics_by_round.png``: running efficacy per round (:class:`~blueedit.callbacks.progress.EditProgress`),
  probe accuracy (:class:`~blueedit.callbacks.drift.HiddenStateDrift`) and general-capability
  scores (:class:`~blueedit.callbacks.progress.GeneralCapability`) against the round;
- ``weight_shift_error.png``: relative weight shift error per layer, one line per diagnosed round
  (:class:`~blueedit.callbacks.weight_shift.WeightShiftError`);
- ``hidden_state_drift.png``: relative drift and cosine against the round.

A plot whose data is absent is skipped. Figures are drawn with :class:`matplotlib.figure.Figure`
(the Agg canvas, no ``pyplot`` state, no display needed). Callbacks are found by their ``history`` attribute and
class, so any object with the same ``history`` layout works (tests use plain objects).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from blueedit.evaluation.metrics import metric_protocol

log = logging.getLogger(__name__)

__all__ = ["write_report", "collect_histories"]

_KINDS = {
    "EditProgress": "progress",
    "GeneralCapability": "general",
    "HiddenStateDrift": "drift",
    "WeightShiftError": "wse",
}


def collect_histories(callbacks: Iterable[Any] | None) -> dict[str, list[dict[str, Any]]]:
    """``{"progress" | "general" | "drift" | "wse": history}`` from the callbacks that have one."""
    out: dict[str, list[dict[str, Any]]] = {}
    for cb in callbacks or []:
        for cls in type(cb).__mro__:
            kind = _KINDS.get(cls.__name__)
            if kind is not None:
                break
        else:
            kind = getattr(cb, "report_kind", None)
        history = getattr(cb, "history", None)
        if kind is not None and history:
            out.setdefault(kind, []).extend(history)
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _sci(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _write_records(path: Path, summary: dict[str, Any]) -> Path | None:
    recs = summary.get("records") or {}
    pre, post = recs.get("pre") or [], recs.get("post") or []
    if not pre and not post:
        return None
    n = max(len(pre), len(post))
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            a = pre[i] if i < len(pre) else None
            b = post[i] if i < len(post) else None
            case_id = (b or a or {}).get("case_id")
            strip = lambda r: None if r is None else {k: v for k, v in r.items() if k != "case_id"}  # noqa: E731
            f.write(json.dumps({"case_id": case_id, "pre": strip(a), "post": strip(b)}, default=str) + "\n")
    return path


def _markdown(summary: dict[str, Any], hist: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        f"# {summary.get('method', '?')} ({summary.get('strategy', '?')})",
        "",
        f"{summary.get('num_edits', '?')} edits in {summary.get('rounds', '?')} rounds, "
        f"{_fmt(summary.get('edit_seconds'), 1)} s editing, layers {summary.get('layers')}",
        "",
    ]
    metrics = summary.get("metrics") or {}
    if metrics:
        lines += ["## Editing metrics", "", "| metric | protocol | pre | post |", "|---|---|---:|---:|"]
        for name, v in metrics.items():
            lines.append(f"| {name} | {metric_protocol(name)} | {_fmt(v.get('pre'))} | {_fmt(v.get('post'))} |")
        lines.append("")
    general = hist.get("general")
    if general:
        first, last = general[0], general[-1]
        tasks = list(dict.fromkeys(list(first.get("tasks", {})) + list(last.get("tasks", {}))))
        lines += ["## General capability", "",
                  f"| task | round {first['round']} | round {last['round']} |", "|---|---:|---:|"]
        for t in tasks:
            a = (first.get("tasks", {}).get(t) or {}).get("main")
            b = (last.get("tasks", {}).get(t) or {}).get("main")
            lines.append(f"| {t} | {_fmt(a, 3)} | {_fmt(b, 3)} |")
        if first.get("perplexity") is not None or last.get("perplexity") is not None:
            lines.append(f"| perplexity | {_fmt(first.get('perplexity'))} | {_fmt(last.get('perplexity'))} |")
        lines.append("")
    drift = hist.get("drift")
    if drift:
        first, last = drift[0], drift[-1]
        lines += ["## Hidden-state drift (probe set of known facts)", "",
                  f"| measure | round {first['round']} | round {last['round']} |", "|---|---:|---:|"]
        for k in ("l2", "relative", "cosine", "probe_accuracy"):
            lines.append(f"| {k} | {_fmt(first.get(k), 4)} | {_fmt(last.get(k), 4)} |")
        lines.append("")
    wse = hist.get("wse")
    if wse:
        lines += ["## Weight shift error (mean over diagnosed rounds)", "",
                  "| layer | rounds | relative | frobenius | cosine(R, R*) | P(o*) distributed δ | P(o*) computed δ* |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for layer in sorted({h["layer"] for h in wse}):
            rows = [h["metrics"] for h in wse if h["layer"] == layer]

            def mean(key: str, rows=rows) -> float | None:
                vals = [r[key] for r in rows if r.get(key) is not None]
                return sum(vals) / len(vals) if vals else None
            lines.append(f"| {layer} | {len(rows)} | {_fmt(mean('relative'), 4)} | {_fmt(mean('frobenius'), 4)} | "
                         f"{_fmt(mean('cosine'), 4)} | {_sci(mean('contribution_distributed'))} | "
                         f"{_sci(mean('contribution_computed'))} |")
        lines.append("")
    return "\n".join(lines)


def _plot_by_round(path: Path, hist: dict[str, list[dict[str, Any]]]) -> Path | None:
    progress = [h for h in hist.get("progress", []) if h.get("efficacy") is not None]
    drift = [h for h in hist.get("drift", []) if h.get("probe_accuracy") is not None]
    general = [h for h in hist.get("general", []) if h.get("tasks") or h.get("perplexity") is not None]
    panels = [p for p, data in (("editing", progress or drift), ("general", general)) if data]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "editing":
            if progress:
                ax.plot([h["round"] for h in progress], [h["efficacy"] for h in progress], "o-",
                        label="efficacy of the round's records")
            if drift:
                ax.plot([h["round"] for h in drift], [h["probe_accuracy"] for h in drift], "s--",
                        label="probe accuracy (known facts)")
            ax.set_ylabel("%")
            ax.set_ylim(-2, 102)
            ax.set_title("Editing progress")
        else:
            tasks = list(dict.fromkeys(t for h in general for t in h.get("tasks", {})))
            for t in tasks:
                pts = [(h["round"], h["tasks"][t]["main"]) for h in general if t in h.get("tasks", {})]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=t)
            ax.set_ylabel("headline metric")
            ax.set_title("General capability")
            ppl = [(h["round"], h["perplexity"]) for h in general if h.get("perplexity") is not None]
            if ppl:
                ax2 = ax.twinx()
                ax2.plot([p[0] for p in ppl], [p[1] for p in ppl], "k:", marker="x", label="perplexity")
                ax2.set_ylabel("perplexity")
                ax2.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("round (-1 = before editing)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_wse(path: Path, wse: list[dict[str, Any]]) -> Path | None:
    if not wse:
        return None
    rounds = sorted({h["round"] for h in wse})
    layers = sorted({h["layer"] for h in wse})
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    for i, r in enumerate(rounds):
        rows = sorted((h for h in wse if h["round"] == r), key=lambda h: h["layer"])
        color = cmap(i / max(1, len(rounds) - 1))
        axes[0].plot([h["layer"] for h in rows], [h["metrics"]["relative"] for h in rows], "o-", color=color,
                     label=f"round {r}")
        axes[1].plot([h["layer"] for h in rows], [h["metrics"].get("cosine", float("nan")) for h in rows], "o-",
                     color=color, label=f"round {r}")
    axes[0].set_title("Relative weight shift error ‖Δ* − Δ‖ / ‖Δ*‖")
    axes[1].set_title("cosine(R, R*)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    if len(rounds) <= 12:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _plot_drift(path: Path, drift: list[dict[str, Any]]) -> Path | None:
    if not drift:
        return None
    x = [h["round"] for h in drift]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(x, [h["relative"] for h in drift], "o-", label="mean ‖h_t − h_0‖ / ‖h_0‖")
    ax.plot(x, [1.0 - h["cosine"] for h in drift], "s--", label="1 − mean cosine(h_t, h_0)")
    ax.set_xlabel("round (-1 = before editing)")
    ax.set_ylabel("drift")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Hidden-state drift of known facts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_report(run_dir: str | Path, summary: dict[str, Any], callbacks: Iterable[Any] | None = None) -> list[Path]:
    """Write ``records.jsonl``, ``metrics.md`` and the plots into ``run_dir``; returns the paths
    written. ``summary`` is the dict of ``metrics.json``; ``callbacks`` the trainer's callbacks."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    hist = collect_histories(callbacks)
    written: list[Path] = []
    rec = _write_records(out / "records.jsonl", summary)
    if rec:
        written.append(rec)
    md = out / "metrics.md"
    md.write_text(_markdown(summary, hist), encoding="utf-8")
    written.append(md)
    for fn, name, data in ((_plot_by_round, "metrics_by_round.png", hist),
                           (_plot_wse, "weight_shift_error.png", hist.get("wse", [])),
                           (_plot_drift, "hidden_state_drift.png", hist.get("drift", []))):
        try:
            p = fn(out / name, data)
        except Exception as e:  # a failed plot must not lose the run's metrics
            log.warning("report plot %s failed: %s", name, e)
            p = None
        if p is not None:
            written.append(p)
    return written
