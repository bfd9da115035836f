"""Editing a small ViT on the digits bed: RefineViT (heads + P) against fine-tuning baselines.

For each ``--seeds`` entry a digits ViT is trained (or read from the cache, see
``blueedit.vision.digits.load_or_train``), its bed is built (groups of (transform, class)
failures under unseen transforms, locality on correct clean held-out images with a sensitive
subset), and then, for every row and every group, each of the group's first ``--edits-per-group``
failures is edited alone, starting from the base model each time (Where-to-Edit's protocol),
and SR / GR / LR are measured. Multi-image editing uses disjoint sets of ``--multi`` images per
group. The premise is measured on the clean held-out images: the share whose prediction changes
when one block's attention output, or its MLP output, is zeroed.

Rows (``--rows``, default all): ``ft-mlp-l1-c<C>`` (fine-tune the last two blocks' MLPs with L1
weight C), ``ft-attn`` (the last two blocks' attention output projections), ``heads`` (top-k by
total effect, no P), ``P`` (no head removed), ``heads+P-k<K>-lam<λ>`` (total effect),
``direct+P``, ``greedy+P``, ``mean+P`` (mean ablation), ``random+P``.

Each seed's edits go to ``--out``/runs/seed<N>.json; seeds can run in separate processes and be
joined with ``--report-only``. Written under ``--out``: ``vit_digits.csv`` (one line per edit), ``vit_digits.json`` (means,
per transform, over seeds; the run record), ``vit_digits.md`` and ``vit_digits_pareto.png``.

Example (the committed results: three processes, then the join; about 15 CPU-minutes in all, training included)::

    for s in 0 1 2; do python -m blueedit.bench.vit_digits --seeds $s --edits-per-group 2 --multi-per-group 1 & done; wait
    python -m blueedit.bench.vit_digits --seeds 0 1 2 --edits-per-group 2 --multi-per-group 1 --report-only
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import time
from pathlib import Path

from blueedit.bench import harness as C

FT_L1 = (0.1, 0.05, 0.025, 0.01, 0.005, 0.001, 0.0)


def row_specs() -> dict[str, dict]:
    """Every row: ``{"kind": "ft", "site", "l1"}`` or ``{"kind": "refine", **RefineConfig fields}``."""
    rows: dict[str, dict] = {f"ft-mlp-l1-c{c:g}": {"kind": "ft", "site": "mlp", "l1": c} for c in FT_L1}
    rows["ft-attn"] = {"kind": "ft", "site": "attention", "l1": 0.0}
    rows["heads"] = {"kind": "refine", "score": "total", "k": 2, "projection": False}
    rows["P"] = {"kind": "refine", "score": "none", "lam": 1.0}
    for k, lam in ((1, 1.0), (2, 1.0), (4, 1.0), (2, 0.1), (2, 10.0)):
        rows[f"heads+P-k{k}-lam{lam:g}"] = {"kind": "refine", "score": "total", "k": k, "lam": lam}
    rows["direct+P"] = {"kind": "refine", "score": "direct", "k": 2, "lam": 1.0}
    rows["greedy+P"] = {"kind": "refine", "score": "total", "selection": "greedy", "max_heads": 4, "lam": 1.0}
    rows["mean+P"] = {"kind": "refine", "score": "total", "k": 2, "ablation": "mean", "lam": 1.0}
    rows["random+P"] = {"kind": "refine", "score": "random", "k": 2, "lam": 1.0}
    return rows


#: Rows also run with several images per edit.
MULTI_ROWS = ("ft-mlp-l1-c0.01", "P", "heads+P-k2-lam1", "direct+P", "greedy+P")


def premise(model, adapter, x):
    """Share of ``x`` whose prediction changes when block l's attention / MLP output is zeroed."""
    from blueedit.vision.digits import predict
    from blueedit.vision.heads import zeroed_block_output

    base = predict(model, x)
    out = {}
    for part in ("attention", "mlp"):
        for l in range(adapter.num_layers):
            with zeroed_block_output(adapter, l, part):
                out[f"{part}/{l}"] = float((predict(model, x) != base).float().mean())
    return out


def edit_sets(group, size: int, limit: int):
    """Disjoint index sets of ``size`` images from the group's start, at most ``limit`` sets."""
    n = len(group.y)
    return [list(range(i, i + size)) for i in range(0, n - size + 1, size)][:limit]


def run_row(name, spec, model, adapter, hooks, bed, base_loc, sets_of, seed):
    """Yield one metrics dict per (group, edit set)."""
    import torch

    from blueedit.vision import finetune as FT
    from blueedit.vision.metrics import edit_metrics
    from blueedit.vision.refine import RefineConfig, refine_edit

    params = saved = None
    if spec["kind"] == "ft":
        layers = list(range(adapter.num_layers - 2, adapter.num_layers))
        params = FT.tuned_parameters(adapter, spec["site"], layers)
        saved = FT.snapshot(params)
    for group in bed.groups:
        for idx in sets_of(group):
            edited = torch.zeros(len(group.y), dtype=torch.bool)
            edited[idx] = True
            x, y = group.x[idx], group.y[idx]
            start = time.process_time()
            if spec["kind"] == "ft":
                steps = FT.finetune_edit(model, params, x, y, l1=spec["l1"], lr=1e-3)
            else:
                cfg = RefineConfig(**{k: v for k, v in spec.items() if k != "kind"}, seed=seed)
                state = refine_edit(hooks, x, y, bed.unrelated_x, cfg)
                steps = int(state.mask.sum())
            seconds = time.process_time() - start
            m = edit_metrics(model, group.x, group.y, edited, bed.locality_x, base_loc, bed.sensitive)
            if spec["kind"] == "ft":
                FT.restore(params, saved)
            else:
                hooks.clear()
            yield {"row": name, "transform": group.transform, "label": group.label, "group_size": len(group.y),
                   "images": len(idx), "first": idx[0], "steps_or_heads": steps, "cpu_seconds": round(seconds, 4), **m}


def mean(values):
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(lines, key_fields):
    """Means over edits, then over seeds: ``{key: {metric: value}}`` per ``key_fields`` tuple."""
    per_seed: dict = {}
    for r in lines:
        per_seed.setdefault(tuple(r[f] for f in key_fields), {}).setdefault(r["seed"], []).append(r)
    out = {}
    for key, seeds in per_seed.items():
        out[key] = {m: mean([mean([r[m] for r in rs if m in r]) for rs in seeds.values()])
                    for m in ("sr", "gr", "lr", "lr_sensitive")}
        out[key]["edits"] = sum(len(rs) for rs in seeds.values())
    return out


def pct(v):
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.1f}"


def pareto_png(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ft = [(summary[(f"ft-mlp-l1-c{c:g}", 1)], c) for c in FT_L1 if (f"ft-mlp-l1-c{c:g}", 1) in summary]
    if ft:
        ax.plot([s["lr"] * 100 for s, _ in ft], [s["gr"] * 100 for s, _ in ft], "o-", label="FT last MLPs, L1 weight c")
        for s, c in ft:
            ax.annotate(f"{c:g}", (s["lr"] * 100, s["gr"] * 100), fontsize=7)
    for label, names in (("heads+P, k (λ=1)", ["heads+P-k1-lam1", "heads+P-k2-lam1", "heads+P-k4-lam1"]),
                         ("heads+P, λ (k=2)", ["heads+P-k2-lam0.1", "heads+P-k2-lam1", "heads+P-k2-lam10"])):
        pts = [(summary[(n, 1)], n) for n in names if (n, 1) in summary]
        if pts:
            ax.plot([s["lr"] * 100 for s, _ in pts], [s["gr"] * 100 for s, _ in pts], "s--", label=label)
            for s, n in pts:
                ax.annotate(n.split("-", 1)[1], (s["lr"] * 100, s["gr"] * 100), fontsize=7)
    for n, marker in (("ft-attn", "^"), ("heads", "v"), ("P", "D"), ("direct+P", "P"), ("greedy+P", "X"),
                      ("mean+P", "*"), ("random+P", "x")):
        if (n, 1) in summary:
            s = summary[(n, 1)]
            ax.plot([s["lr"] * 100], [s["gr"] * 100], marker, label=n)
    ax.set_xlabel("LR: locality rate (%)")
    ax.set_ylabel("GR: generalization rate (%)")
    ax.set_title("Digits ViT, single-image edits (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(payload) -> str:
    s = payload["summary"]
    transforms = payload["transforms"]
    lines = [f"# ViT editing on the digits bed ({len(payload['seeds'])} seeds)", "",
             f"Command: `{payload['command']}`", "",
             f"Models: {payload['model']}; base accuracy (clean held-out, mean over seeds) "
             f"{pct(payload['clean_accuracy'])} %; per transform: "
             + ", ".join(f"{t} {pct(v)} %" for t, v in payload["transformed_accuracy"].items()), "",
             f"Groups per seed: {payload['groups_per_seed']}; locality images per seed: {payload['locality_per_seed']} "
             f"(sensitive: {payload['sensitive_per_seed']}).", "",
             "## Single-image edits: SR / GR / LR (%) per transform, and overall (LR_s: sensitive subset)", "",
             "| row | " + " | ".join(transforms) + " | all | LR_s |",
             "|---|" + "---|" * (len(transforms) + 2)]
    for row in payload["rows"]:
        cells = []
        for t in transforms + ["all"]:
            v = s["per_transform"].get(f"{row}|1|{t}")
            cells.append("/".join(pct(v[m]) for m in ("sr", "gr", "lr")) if v else "")
        lrs = s["per_transform"].get(f"{row}|1|all", {}).get("lr_sensitive", float("nan"))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {pct(lrs)} |")
    lines += ["", "## Multi-image edits (all transforms): SR / GR / LR (%)", "", "| row | images | SR | GR | LR | edits |",
              "|---|---|---|---|---|---|"]
    for key, v in sorted(s["per_transform"].items()):
        row, images, t = key.split("|")
        if int(images) > 1 and t == "all":
            lines.append(f"| {row} | {images} | {pct(v['sr'])} | {pct(v['gr'])} | {pct(v['lr'])} | {v['edits']} |")
    lines += ["", "## Premise: share of clean held-out predictions that change when a block's output is zeroed (%)", "",
              "| block | attention | MLP |", "|---|---|---|"]
    for l in range(payload["num_layers"]):
        lines.append(f"| {l} | {pct(payload['premise'][f'attention/{l}'])} | {pct(payload['premise'][f'mlp/{l}'])} |")
    lines += ["", f"Pareto plot: `vit_digits_pareto.png`. CPU time of the seed processes: {payload['cpu_seconds']:.0f} s "
              f"(editing {payload['edit_cpu_seconds']:.0f} s, training in them {payload['train_cpu_seconds']:.0f} s); "
              "the models' training, wall seconds from their cache entries: "
              + ", ".join(str(t) for t in payload["train_wall_seconds_from_cache"]) + ".", ""]
    return "\n".join(lines)


def run_seed(seed: int, args, rows, specs, started: float) -> dict:
    """Train (or read) the seed's model, build its bed, run every row: the seed's record."""
    from blueedit.vision.digits import (
        TRANSFORMS,
        TrainConfig,
        accuracy,
        apply_transform,
        build_bed,
        load_digits_split,
        load_or_train,
        predict,
    )
    from blueedit.vision.heads import EditHooks
    from blueedit.vision.vit import ViTAdapter

    wall0, cpu0 = time.time(), time.process_time()
    split = load_digits_split()
    model, _ = load_or_train(TrainConfig(seed=seed, steps=args.train_steps), args.cache_dir)
    train_cpu = time.process_time() - cpu0
    adapter = ViTAdapter.of(model)
    bed = build_bed(model, split, groups_per_transform=args.groups_per_transform)
    record = {"seed": seed, "clean_accuracy": accuracy(model, split.heldout_x, split.heldout_y),
              "transformed_accuracy": {t: accuracy(model, apply_transform(t, split.heldout_x), split.heldout_y)
                                       for t in TRANSFORMS},
              "groups": [g.name + f" ({len(g.y)})" for g in bed.groups], "locality": len(bed.locality_y),
              "sensitive": int(bed.sensitive.sum()), "premise": premise(model, adapter, split.heldout_x),
              "num_layers": adapter.num_layers, "train_cpu_seconds": round(train_cpu, 1),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall0))}
    base_loc = predict(model, bed.locality_x)
    hooks = EditHooks(adapter)
    lines = []
    for size in [1] + list(args.multi):
        chosen = rows if size == 1 else [r for r in rows if r in MULTI_ROWS]
        limit = args.edits_per_group if size == 1 else args.multi_per_group
        for name in chosen:
            n = len(lines)
            lines += [{"seed": seed, **r} for r in run_row(name, specs[name], model, adapter, hooks, bed, base_loc,
                                                          lambda g, size=size, limit=limit: edit_sets(g, size, limit), seed)]
            print(f"seed {seed} images {size} {name}: {len(lines) - n} edits ({time.time() - started:.0f}s)", flush=True)
    hooks.remove()
    edit_cpu = sum(r["cpu_seconds"] for r in lines)
    record.update(lines=lines, wall_seconds=round(time.time() - wall0, 1),
                  other_cpu_seconds=round(time.process_time() - cpu0 - train_cpu - edit_cpu, 1))
    return record


def build_parser():
    """The command line of the benchmark."""
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the digits ViT")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--groups-per-transform", type=int, default=3, help="the largest failure groups of each transform")
    p.add_argument("--edits-per-group", type=int, default=4, help="single-image edits per group")
    p.add_argument("--multi", type=int, nargs="*", default=[2, 3], help="images per multi-image edit")
    p.add_argument("--multi-per-group", type=int, default=2, help="multi-image edit sets per group")
    p.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true",
                   help="only join the per-seed records under OUT/runs (seeds run in separate processes)")
    p.add_argument("--cache-dir", default=None, help="where the trained models are cached (default $BLUEEDIT_CACHE)")
    p.add_argument("--out", default=str(C.RESULTS / "vit_digits"))
    return p


def main(argv: list[str] | None = None) -> None:
    """Run every seed (unless ``--report-only``), then join the seeds' records and write the report."""
    args = build_parser().parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    specs = row_specs()
    rows = args.rows or list(specs)
    unknown = [r for r in rows if r not in specs]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(specs)}")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    settings = {k: getattr(args, k) for k in ("train_steps", "groups_per_transform", "edits_per_group", "multi",
                                              "multi_per_group")}
    if not args.report_only:
        for seed in args.seeds:
            record = run_seed(seed, args, rows, specs, started)
            record.update(settings=settings, command=C.command_line("vit_digits", argv), rows=rows)
            (out / "runs" / f"seed{seed}.json").write_text(json.dumps(record))
    records = read_seed_records(out, args.seeds, settings)
    lines = [l for r in records for l in r["lines"]]
    rows = [r for r in specs if any(l["row"] == r for l in lines)]
    summary, overall = summaries(lines)
    write_csv(out / "vit_digits.csv", lines)
    payload = report_payload(args, argv, rows, records, lines, summary)
    (out / "vit_digits.json").write_text(json.dumps(payload, indent=1))
    (out / "vit_digits.md").write_text(markdown(payload))
    pareto_png(overall, out / "vit_digits_pareto.png")
    print((out / "vit_digits.md").read_text())


def read_seed_records(out: Path, seeds: list[int], settings: dict) -> list[dict]:
    """Read each seed's record from ``out/runs``, checking it exists and was run with ``settings``."""
    records = []
    for seed in seeds:
        path = out / "runs" / f"seed{seed}.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run --seeds {seed} first")
        record = json.loads(path.read_text())
        if record["settings"] != settings:
            raise SystemExit(f"{path} was run with {record['settings']}, not {settings}")
        records.append(record)
    return records


def summaries(lines: list[dict]) -> tuple[dict, dict]:
    """Means per (row, images, transform) and over all transforms: the JSON summary and the plot's points."""
    per_t = summarize(lines, ("row", "images", "transform"))
    per_all = summarize([{**r, "transform": "all"} for r in lines], ("row", "images", "transform"))
    summary = {"per_transform": {"|".join(map(str, k)): v for k, v in {**per_t, **per_all}.items()}}
    overall = {(k[0], k[1]): v for k, v in per_all.items()}
    return summary, overall


def write_csv(path: Path, lines: list[dict]) -> None:
    """Write one CSV line per edit."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0].keys()) + (["lr_sensitive"] if "lr_sensitive" not in lines[0] else []))
        w.writeheader()
        w.writerows(lines)


def report_payload(args, argv: list[str] | None, rows: list[str], records: list[dict], lines: list[dict],
                   summary: dict) -> dict:
    """The JSON report: provenance, models, accuracies, bed sizes, premise, summary and CPU times over the seeds."""
    from blueedit.vision.digits import TRANSFORMS, TrainConfig, checkpoint_dir

    accs = [r["clean_accuracy"] for r in records]
    t_accs = {t: [r["transformed_accuracy"][t] for r in records] for t in TRANSFORMS}
    premises = [r["premise"] for r in records]
    info = {"groups": [r["groups"] for r in records], "locality": [r["locality"] for r in records],
            "sensitive": [r["sensitive"] for r in records]}
    train_cpu = sum(r["train_cpu_seconds"] for r in records)
    trained = [checkpoint_dir(TrainConfig(seed=s, steps=args.train_steps), args.cache_dir) / "training.json"
               for s in args.seeds]
    train_wall = [json.loads(t.read_text()).get("train_seconds") if t.is_file() else None for t in trained]
    edit_cpu = sum(r["cpu_seconds"] for r in lines)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=C.REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "command": C.command_line("vit_digits", argv), "git_commit": commit, "versions": C.versions(),
        "device": C.device_description("cpu"), "seeds": args.seeds, "rows": rows, "transforms": list(TRANSFORMS),
        "model": "ViT from config: 8x8 images, patch 2, d 64, 4 blocks x 4 heads, MLP 128, "
                 f"{args.train_steps} AdamW steps x 128 on clean digits with +-1-pixel shifts",
        "num_layers": records[0]["num_layers"], "seed_commands": [r["command"] for r in records],
        "seed_wall_seconds": [r["wall_seconds"] for r in records],
        "clean_accuracy": mean(accs), "transformed_accuracy": {t: mean(v) for t, v in t_accs.items()},
        "groups_per_seed": [len(g) for g in info["groups"]], "groups": info["groups"],
        "locality_per_seed": info["locality"], "sensitive_per_seed": info["sensitive"],
        "premise": {k: mean([p_[k] for p_ in premises]) for k in premises[0]},
        "premise_per_seed": premises, "summary": summary,
        "cpu_seconds": round(edit_cpu + train_cpu + sum(r["other_cpu_seconds"] for r in records), 1),
        "edit_cpu_seconds": round(edit_cpu, 1), "train_cpu_seconds": round(train_cpu, 1),
        "train_wall_seconds_from_cache": train_wall,
        "seed_started": [r["started"] for r in records],
    }


if __name__ == "__main__":
    main()
