"""The speed benchmark on two revisions of blueedit, in one run on one machine.

    python -m blueedit.bench.speed_ab --baseline <git revision or checkout> --repeats 2 \\
        --out benchmarks/results/speed_ab.json -- --num-edits 100 --edits-per-round 100 \\
        --modes optimized-bf16 --strategy boundary --loss-layer 29 --threads 1 --max-batch-tokens 1024

Speed figures from different runs mix the code with the machine's load (on a shared machine even
CPU seconds inflate with it). Here both sides run ``python -m blueedit.bench.speed`` with the same
arguments (those after ``--``), each in its own process with its own ``src`` first on
``PYTHONPATH``, alternating (baseline, current) ``--repeats`` times, so that both see the same
load; the 1-minute load average is recorded before and after every process. ``--baseline`` is a
git revision (checked out into a temporary worktree, removed afterwards) or the path of a checkout.

Written to ``--out`` (and a ``.md`` beside it): every process's editing CPU seconds and wall
seconds per edit, mean target steps per layer and metrics; per mode the ratio baseline / current
of the medians, and the largest metric difference between the sides (the speed-up counts only
at equal metrics).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from blueedit.bench import harness as C

SIDES = ("baseline", "current")
METRICS = ("efficacy", "generalization", "specificity")
#: per-process quantities read from the speed benchmark's result, per mode
FIELDS = ("cpu_seconds_per_edit", "seconds_per_edit", "mean_target_steps", "mean_target_steps_per_layer", *METRICS)


def checkout(baseline: str, tmp: Path) -> tuple[Path, dict, bool]:
    """``(root, git record, created)``: ``baseline`` as a checkout path, or a git revision of this
    repository checked out into a detached worktree under ``tmp``."""
    path = Path(baseline).expanduser()
    if (path / "src" / "blueedit").is_dir():
        return path.resolve(), C.git_commit(path), False
    root = tmp / "baseline"
    done = subprocess.run(["git", "-C", str(C.REPO), "worktree", "add", "--detach", str(root), baseline],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--baseline {baseline!r} is neither a checkout of blueedit nor a git revision of "
                         f"{C.REPO}: {done.stderr.strip()}")
    return root, {"revision": baseline, **C.git_commit(root)}, True


def run_side(root: Path, speed_argv: list[str], out: Path) -> dict:
    """One process of the speed benchmark from checkout ``root``; its result with the load averages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "blueedit.bench.speed", *speed_argv, "--out", str(out)],
                          cwd=root, env=env, capture_output=True, text=True)
    after = os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"the speed benchmark failed in {root}:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"load_average_1min_before_after": [before, after],
            "modes": {mode: {k: r.get(k) for k in FIELDS} for mode, r in result["modes"].items()}}


def summary(runs: list[dict]) -> dict:
    """Per mode: each side's median CPU and wall seconds per edit, baseline / current ratios and
    the largest metric difference between any two processes of the two sides."""
    out = {}
    for mode in runs[0]["modes"]:
        per = {s: [r["modes"][mode] for r in runs if r["side"] == s] for s in SIDES}
        med = {s: {k: statistics.median(p[k] for p in per[s]) for k in ("cpu_seconds_per_edit", "seconds_per_edit")}
               for s in SIDES}
        diff = max(abs(a[m] - b[m]) for a in per["baseline"] for b in per["current"] for m in METRICS)
        out[mode] = {"median": med,
                     "cpu_ratio": med["baseline"]["cpu_seconds_per_edit"] / med["current"]["cpu_seconds_per_edit"],
                     "wall_ratio": med["baseline"]["seconds_per_edit"] / med["current"]["seconds_per_edit"],
                     "metrics": {s: [{m: p[m] for m in METRICS} for p in per[s]] for s in SIDES},
                     "metrics_max_abs_difference": diff}
    return out


def markdown(payload: dict) -> str:
    base, cur = payload["baseline"], payload["current"]
    lines = [f"baseline `{base.get('revision', '')}` ({str(base.get('commit'))[:10]}) against current "
             f"({str(cur.get('commit'))[:10]}{', uncommitted changes' if cur.get('dirty') else ''}); "
             f"speed benchmark arguments: `{' '.join(payload['speed_argv'])}`; {payload['device']}.", "",
             "| process | side | mode | CPU s / edit | wall s / edit | target steps per layer | efficacy | "
             "generalization | specificity | load before → after |",
             "|---:|---|---|---:|---:|---|---:|---:|---:|---|"]
    for i, r in enumerate(payload["runs"], 1):
        lo = r["load_average_1min_before_after"]
        for mode, v in r["modes"].items():
            steps = ", ".join(f"{k}: {s:.1f}" for k, s in (v["mean_target_steps_per_layer"] or {}).items())
            lines.append(f"| {i} | {r['side']} | {mode} | {v['cpu_seconds_per_edit']:.3f} | {v['seconds_per_edit']:.3f} | "
                         f"{steps} | {v['efficacy']:.2f} | {v['generalization']:.2f} | {v['specificity']:.2f} | "
                         f"{lo[0]:.2f} → {lo[1]:.2f} |")
    lines += ["", "| mode | baseline CPU s / edit | current CPU s / edit | CPU ratio | wall ratio | metrics max |difference| |",
              "|---|---:|---:|---:|---:|---:|"]
    for mode, s in payload["summary"].items():
        lines.append(f"| {mode} | {s['median']['baseline']['cpu_seconds_per_edit']:.3f} | "
                     f"{s['median']['current']['cpu_seconds_per_edit']:.3f} | {s['cpu_ratio']:.2f}x | "
                     f"{s['wall_ratio']:.2f}x | {s['metrics_max_abs_difference']:.2f} |")
    lines += ["", "Medians over the processes of each side; ratios are baseline / current (above 1: the current "
              "code is faster). Processes alternate between the sides."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    record = C.RunRecord("speed_ab", argv)
    own, speed_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="git revision of this repository, or the path of a checkout")
    p.add_argument("--repeats", type=int, default=1, help="processes per side, alternating")
    p.add_argument("--out", required=True, help="result JSON (a .md is written beside it)")
    args = p.parse_args(own)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if "--out" in speed_argv:
        p.error("the speed benchmark's --out is set per process: leave it out after --")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="blueedit-speed-ab-") as tmp:
        tmp = Path(tmp)
        base_root, base_git, created = checkout(args.baseline, tmp)
        roots = {"baseline": base_root, "current": C.REPO}
        runs = []
        try:
            for i in range(args.repeats):
                for side in SIDES:
                    print(f"[speed_ab] {side}, process {i + 1} of {args.repeats}", flush=True)
                    runs.append({"side": side, **run_side(roots[side], speed_argv, tmp / f"{side}_{i}.json")})
        finally:
            if created:
                subprocess.run(["git", "-C", str(C.REPO), "worktree", "remove", "--force", str(base_root)],
                               capture_output=True)
                subprocess.run(["git", "-C", str(C.REPO), "worktree", "prune"], capture_output=True)
    payload = {"command": record.command, "speed_argv": speed_argv, "versions": C.versions(),
               "device": C.device_description(speed_argv[speed_argv.index("--device") + 1] if "--device" in speed_argv else "cpu"), "baseline": base_git, "current": C.git_commit(),
               "runs": runs, "summary": summary(runs), "run": record.as_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown(payload)
    out.with_suffix(".md").write_text(text)
    print(text)
    return payload


if __name__ == "__main__":
    main()
