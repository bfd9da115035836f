"""A small sweep of WISE's edited layer and margins on a development set (default ``zsre_dev``).

The model is loaded once; for each ``--settings`` entry ``LAYER:ALPHA:BETA:GAMMA`` a fresh side
memory is attached, the first ``--num-edits`` records are edited one at a time (lifelong), the
edited records are evaluated (reliability = efficacy, generalization, locality against the pre-edit
predictions, docs/algorithms.md §8), and the side memory is removed again (the model is the
pre-edit one between settings). The other WISE settings come from ``--config``'s ``editing.wise``.

Written under ``--out``: ``wise_sweep.json`` and ``wise_sweep.md``.

Example (the choice in ``configs/smollm2-135m/wise.yaml``)::

    python benchmarks/wise_sweep.py --num-edits 5 --settings 20:5:20:10 24:5:20:10 24:2:10:5
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m/wise.yaml")
    p.add_argument("--dataset", default="zsre_dev")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--settings", nargs="+", required=True,
                   help="LAYER:ALPHA:BETA:GAMMA[:ACT_RATIO] (act_ratio: the config's when left out)")
    p.add_argument("--name", default="wise_sweep", help="stem of the output files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(C.REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import torch
    import yaml

    from blueedit.data.formats import load_requests
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.targets import TargetConfig
    from blueedit.editing.wise import WiseConfig, WiseEditor, irrelevant_inputs, wise_context_templates
    from blueedit.evaluation.editing_metrics import add_locality, evaluate_requests
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    base_wise = WiseConfig(**cfg["editing"].get("wise", {}))
    lm, tok = load_model_and_tokenizer(ModelConfig(**cfg["model"]), C.os.environ.get("BLUEEDIT_CACHE"))
    adapter = ModelAdapter(lm)
    requests = load_requests(args.dataset, num_edits=args.num_edits)
    pool = load_requests(base_wise.irrelevant_dataset)
    irrelevant = irrelevant_inputs(pool, {q for r in requests for q in r.neighborhood})
    templates = wise_context_templates(lm, tok, base_wise.context_lengths)
    pre = evaluate_requests(lm, tok, requests)
    rows = []
    for spec in args.settings:
        layer, a, b, g, *rest = spec.split(":")
        act_ratio = float(rest[0]) if rest else base_wise.act_ratio
        wise = replace(base_wise, alpha=float(a), beta=float(b), gamma=float(g), act_ratio=act_ratio)
        hp = EditingConfig(method="wise", layers=[int(layer)], wise=wise, target=TargetConfig())
        editor = WiseEditor(lm, tok, adapter, hp, templates, irrelevant)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        steps = []
        for i, r in enumerate(requests):
            rep = editor.edit_round([r], i)
            steps += rep.target_steps[int(layer)]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        post = evaluate_requests(lm, tok, requests)
        add_locality(post, pre)
        editor.remove()
        row = {"layer": int(layer), "alpha": float(a), "beta": float(b), "gamma": float(g), "act_ratio": act_ratio,
               "metrics": post.metrics, "mean_steps": sum(steps) / len(steps), "wall_per_edit": wall / len(requests),
               "cpu_per_edit": cpu / len(requests), "threshold": editor.state.current_threshold}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/wise_sweep.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "dataset": args.dataset,
                                                     "num_edits": args.num_edits, "pre": pre.metrics,
                                                     "rows": rows, "versions": C.versions()}, indent=1))
    lines = [f"WISE sweep on `{args.dataset}`, {args.num_edits} edits one at a time (lifelong); other settings "
             f"from `{args.config}`. Pre-edit: reliability {pre.metrics['efficacy']:.1f}, generalization "
             f"{pre.metrics['generalization']:.1f}.", "",
             "| layer | α | β | γ | act_ratio | reliability | generalization | locality | ε | steps / edit | CPU s / edit |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['layer']} | {r['alpha']:g} | {r['beta']:g} | {r['gamma']:g} | {r['act_ratio']:g} | "
                     f"{m['efficacy']:.1f} | "
                     f"{m['generalization']:.1f} | {m.get('locality', float('nan')):.1f} | {r['threshold']:.2f} | "
                     f"{r['mean_steps']:.0f} | {r['cpu_per_edit']:.1f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
