"""Paired comparison of two arms evaluated on the same records: per-metric differences with a 95 %
bootstrap interval over records, McNemar's exact test on per-record success, and the verdict
(``blueedit.evaluation.paired`` states the statistics).

Two runs of ``sequence.py`` (their ``runs/<run>.json``; one comparison per evaluation point, matched
by the number of edits, from the per-record values each evaluation stores)::

    python -m blueedit.bench.paired --results benchmarks/results/counterfact_memit_2000 \\
        --runs memit_distribute memit_boundary

Two evaluation records that hold per-record outcomes (``blueedit fit``'s ``metrics.json`` with its
``records``; ``FILE:pre`` or ``FILE:post`` picks the evaluation)::

    python -m blueedit.bench.paired --arms benchmarks/results/gemma3_dtype/memit_50_float32.json:post \\
        benchmarks/results/gemma3_dtype/memit_50_bfloat16.json:post --out benchmarks/results/gemma3_dtype

Written to ``--out`` (default: the ``--results`` directory) as ``<stem>.json`` (every number, the
command, the arms' versions), ``<stem>.csv`` (one row per evaluation point × metric) and
``<stem>.md`` (the tables). Arm A is the first named, B the second; differences are B − A.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from blueedit.bench import harness as C
from blueedit.evaluation.editing_metrics import record_values
from blueedit.evaluation.paired import DEFAULT_METRICS, compare_records

SUCCESS_THRESHOLD = 50.0  # the default of blueedit.evaluation.paired.paired_difference
COLUMNS = ["edits", "metric", "n", "mean_a", "mean_b", "difference", "low", "high", "confidence",
           "a_only", "b_only", "p_value", "verdict"]


def parse_args(argv: list[str] | None):
    p = C.plain_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs=2, metavar=("A", "B"), help="two run names under --results/runs/")
    src.add_argument("--arms", nargs=2, metavar=("A", "B"),
                     help="two files: sequence run records, or evaluation records as FILE:pre / FILE:post")
    p.add_argument("--results", type=Path, help="a sequence.py results directory (with --runs)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the arms (default: run or file names)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--out", type=Path, help="output directory (default: --results)")
    p.add_argument("--stem", default="paired", help="output file name without extension (default paired)")
    args = p.parse_args(argv)
    if args.runs and args.results is None:
        p.error("--runs needs --results (the directory that holds runs/<run>.json)")
    if args.arms and args.out is None:
        p.error("--arms needs --out")
    return args


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"{what}: no such file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{what}: {path} is not JSON ({e})") from None


def load_arm(spec: str, what: str) -> dict[str, Any]:
    """One arm as ``{"points": {edits: [per-record values]}, "skipped": [edits without records],
    "versions": ..., "source": spec}``.

    A sequence run record (``sequence`` history) gives one point per evaluation after editing; an
    evaluation record (``kind`` and ``records: {pre, post}``, named ``FILE:pre`` / ``FILE:post``)
    gives one point, at its ``num_edits`` (for ``pre`` too: the unedited model on the run's records).
    """
    path_text, _, which = spec.rpartition(":") if spec.endswith((":pre", ":post")) else (spec, "", "")
    path = Path(path_text)
    data = _read_json(path, what)
    if which:
        records = (data.get("records") or {}).get(which)
        if not records:
            raise SystemExit(f"{what}: {path} holds no per-record outcomes under records.{which}")
        kind = data.get("kind")
        if kind not in ("counterfact", "zsre"):
            raise SystemExit(f"{what}: {path} does not say which kind of evaluation it is (kind: {kind!r})")
        values = [{"case_id": r.get("case_id"), **record_values(r, kind)} for r in records]
        edits = int(data.get("num_edits", len(records)))  # pre and post: the records of one run
        return {"points": {edits: values}, "skipped": [], "versions": data.get("versions"), "source": spec}
    if "sequence" not in data:
        raise SystemExit(f"{what}: {path} is neither a sequence run record (no 'sequence' history) nor named "
                         f"as FILE:pre / FILE:post")
    points: dict[int, list[dict[str, Any]]] = {}
    skipped: list[int] = []
    for entry in data.get("sequence") or []:
        if entry.get("round", 0) < 0:
            continue  # the unedited model: the same for both arms
        if entry.get("records"):
            points[int(entry["edits"])] = entry["records"]
        else:
            skipped.append(int(entry["edits"]))
    return {"points": points, "skipped": skipped, "versions": data.get("versions"), "source": spec}


def compare_arms(arm_a: dict[str, Any], arm_b: dict[str, Any], names: tuple[str, str], metrics: list[str],
                 *, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Rows of :data:`COLUMNS` for every evaluation point both arms have per-record values for."""
    common = sorted(set(arm_a["points"]) & set(arm_b["points"]))
    if not common:
        raise SystemExit(f"{names[0]} and {names[1]} share no evaluation point with per-record values "
                         f"(A has {sorted(arm_a['points'])}, B has {sorted(arm_b['points'])}; runs recorded "
                         "before per-record values were stored have none)")
    rows = []
    for edits in common:
        results = compare_records(arm_a["points"][edits], arm_b["points"][edits], metrics,
                                  what_a=f"{names[0]} at {edits} edits", what_b=f"{names[1]} at {edits} edits",
                                  num_resamples=resamples, seed=seed, success_threshold=SUCCESS_THRESHOLD)
        rows += [{"edits": edits, **r.to_dict()} for r in results]
    return rows


def _fmt(v: float) -> str:
    return f"{v:+.2f}"


def p_text(p: float) -> str:
    """McNemar's p as shown in the tables: three significant digits."""
    return f"{p:.3g}"


def markdown(payload: dict[str, Any]) -> str:
    a, b = payload["names"]
    lines = [f"### {b} against {a}: paired differences over the same records", "",
             "```bash", payload["command"], "```", "",
             f"| edits | metric | records | {a} | {b} | {b} − {a} | 95 % interval | {a} only | {b} only "
             "| McNemar p | verdict |",
             "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in payload["rows"]:
        lead = {"A": a, "B": b, "tie": "tie"}[r["verdict"]]
        lines.append(f"| {r['edits']} | {r['metric']} | {r['n']} | {r['mean_a']:.2f} | {r['mean_b']:.2f} | "
                     f"{_fmt(r['difference'])} | [{_fmt(r['low'])}, {_fmt(r['high'])}] | {r['a_only']} | "
                     f"{r['b_only']} | {p_text(r['p_value'])} | {lead} |")
    lines += ["", f"Values in percent, averaged per record then over records; `{b} − {a}` in points with its 95 % "
              f"percentile-bootstrap interval over records ({payload['resamples']:,} resamples, seed "
              f"{payload['seed']}). `{a} only` / `{b} only`: records that succeed (value above 50) in that arm "
              "only; McNemar's exact two-sided p on them. A lead whose interval contains 0 is a tie."]
    if payload["skipped"]:
        lines += ["", "Evaluation points without per-record values (not compared): "
                  + ", ".join(str(e) for e in payload["skipped"]) + " edits."]
    return "\n".join(lines) + "\n"


def build(argv: list[str] | None = None) -> tuple[dict[str, Any], Path, str]:
    """The comparison of the command line ``argv``: ``(payload, output directory, stem)``; writes nothing."""
    args = parse_args(argv)
    if args.runs:
        specs = [str(args.results / "runs" / f"{r}.json") for r in args.runs]
        names = tuple(args.names or args.runs)
        out = args.out or args.results
    else:
        specs = list(args.arms)
        names = tuple(args.names or [Path(s.rsplit(":", 1)[0]).stem for s in args.arms])
        out = args.out
    arm_a, arm_b = (load_arm(s, n) for s, n in zip(specs, names))
    rows = compare_arms(arm_a, arm_b, names, args.metrics, resamples=args.resamples, seed=args.seed)
    skipped = sorted(set(arm_a["skipped"]) | set(arm_b["skipped"]))
    payload = {"command": C.command_line("paired", argv), "names": list(names), "sources": specs,
               "versions": {names[0]: arm_a["versions"], names[1]: arm_b["versions"]},
               "resamples": args.resamples, "seed": args.seed, "success_threshold": SUCCESS_THRESHOLD,
               "skipped": skipped, "rows": rows}
    return payload, out, args.stem


def outputs(payload: dict[str, Any]) -> dict[str, str]:
    """The text of each output file, by extension: ``json``, ``csv``, ``md``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in payload["rows"]:
        w.writerow({k: r[k] for k in COLUMNS})
    return {"json": json.dumps(payload, indent=1) + "\n", "csv": buf.getvalue(), "md": markdown(payload)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    payload, out, stem = build(argv)
    out.mkdir(parents=True, exist_ok=True)
    texts = outputs(payload)
    for ext, text in texts.items():
        (out / f"{stem}.{ext}").write_text(text)
    print(texts["md"])
    return payload


if __name__ == "__main__":
    main()
