"""A small sweep of WISE's edited layer and margins on a development set (default ``zsre_dev``).

The model is loaded once; for each ``--settings`` entry ``LAYER:ALPHA:BETA:GAMMA[:ACT_RATIO]``
(optionally followed by ``/key=value,...``: other ``editing.wise`` settings, e.g.
``/variant=retrieve,shard_size=10,merge_every=10``) a fresh side memory is attached, the first
``--num-edits`` records are edited one at a time (lifelong), the edited records are evaluated
(reliability = efficacy, generalization, locality against the pre-edit predictions,
docs/algorithms.md §8), and the side memory is removed again (the model is the pre-edit one
between settings). The other WISE settings come from ``--config``'s ``editing.wise``.

"just edited" is the mean reliability of each record evaluated right after its own edit; the
difference to the final reliability is what the later edits took away (forgetting).

Written under ``--out``: ``wise_sweep.json`` and ``wise_sweep.md``.

Example (the choice in ``configs/smollm2-135m/wise.yaml``)::

    python -m blueedit.bench.wise_sweep --num-edits 5 --settings 20:5:20:10 24:5:20:10 24:2:10:5
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from blueedit.bench import harness as C


def build_parser():
    """The command line of the sweep."""
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m/wise.yaml")
    p.add_argument("--dataset", default="zsre_dev")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--settings", nargs="+", required=True,
                   help="LAYER:ALPHA:BETA:GAMMA[:ACT_RATIO][/key=value,...] (act_ratio and the other "
                        "editing.wise settings: the config's when left out)")
    p.add_argument("--name", default="wise_sweep", help="stem of the output files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(C.RESULTS))
    return p


def main(argv: list[str] | None = None) -> None:
    """Check the settings, load the model and records, run every setting, write the table."""
    record = C.RunRecord("wise_sweep", argv)
    args = build_parser().parse_args(argv)

    import torch
    import yaml

    from blueedit.data.formats import load_requests
    from blueedit.editing.wise import WiseConfig, irrelevant_inputs, wise_context_templates
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    base_wise = WiseConfig(**cfg["editing"].get("wise", {}))
    settings = [parse_setting(spec, base_wise) for spec in args.settings]  # all checked before any work
    lm, tok = load_model_and_tokenizer(ModelConfig(**cfg["model"]), C.os.environ.get("BLUEEDIT_CACHE"))
    adapter = ModelAdapter(lm)
    requests = load_requests(args.dataset, num_edits=args.num_edits)
    pool = load_requests(base_wise.irrelevant_dataset)
    irrelevant = irrelevant_inputs(pool, {q for r in requests for q in r.neighborhood})
    templates = wise_context_templates(lm, tok, base_wise.context_lengths)
    pre = evaluate_requests(lm, tok, requests)
    rows = []
    for _spec, (layer, wise, extra) in zip(args.settings, settings):
        row = run_setting(lm, tok, adapter, templates, irrelevant, requests, pre, layer, wise, extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(args, record, pre, rows)


def run_setting(lm, tok, adapter, templates, irrelevant, requests, pre, layer, wise, extra: dict) -> dict:
    """Edit the records one at a time into a fresh side memory, evaluate, remove it: the setting's row."""
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.targets import TargetConfig
    from blueedit.editing.wise import WiseEditor
    from blueedit.evaluation.editing_metrics import add_locality, evaluate_requests

    a, b, g, act_ratio = wise.alpha, wise.beta, wise.gamma, wise.act_ratio
    hp = EditingConfig(method="wise", layers=[int(layer)], wise=wise, target=TargetConfig())
    editor = WiseEditor(lm, tok, adapter, hp, templates, irrelevant)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    steps, just_edited, eval_cpu = [], [], 0.0
    for i, r in enumerate(requests):
        rep = editor.edit_round([r], i)
        steps += rep.target_steps[int(layer)]
        e0 = time.process_time()
        just_edited.append(evaluate_requests(lm, tok, [r]).metrics["efficacy"])
        eval_cpu += time.process_time() - e0
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0 - eval_cpu
    post = evaluate_requests(lm, tok, requests)
    add_locality(post, pre)
    editor.remove()
    st = editor.state
    return {"layer": int(layer), "alpha": float(a), "beta": float(b), "gamma": float(g), "act_ratio": act_ratio,
            "other": extra, "just_edited": sum(just_edited) / len(just_edited), "metrics": post.metrics,
            "mean_steps": sum(steps) / len(steps), "wall_per_edit": wall / len(requests),
            "cpu_per_edit": cpu / len(requests),
            "threshold": min([st.current_threshold] + st.shard_thresholds + st.memory_thresholds)}


def write_results(args, record: C.RunRecord, pre, rows: list[dict]) -> None:
    """Write ``<name>.json`` and the table ``<name>.md`` under ``--out``, and print the table."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = record.command
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "dataset": args.dataset,
                                                     "num_edits": args.num_edits, "pre": pre.metrics,
                                                     "rows": rows, "versions": C.versions(),
                                                     "run": record.as_dict()}, indent=1))
    lines = [f"WISE sweep on `{args.dataset}`, {args.num_edits} edits one at a time (lifelong); other settings "
             f"from `{args.config}`. Pre-edit: reliability {pre.metrics['efficacy']:.1f}, generalization "
             f"{pre.metrics['generalization']:.1f}.", "",
             "| layer | α | β | γ | act_ratio | other | just edited | reliability | generalization | locality | ε | "
             "steps / edit | CPU s / edit |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["metrics"]
        other = ", ".join(f"{k} {v}" for k, v in r.get("other", {}).items()) or "-"
        just = r.get("just_edited")
        eps = f"{r['threshold']:.2f}" if math.isfinite(r["threshold"]) else "-"
        lines.append(f"| {r['layer']} | {r['alpha']:g} | {r['beta']:g} | {r['gamma']:g} | {r['act_ratio']:g} | "
                     f"{other} | {'-' if just is None else f'{just:.1f}'} | {m['efficacy']:.1f} | "
                     f"{m['generalization']:.1f} | {m.get('locality', float('nan')):.1f} | {eps} | "
                     f"{r['mean_steps']:.0f} | {r['cpu_per_edit']:.1f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    print("\n".join(lines))


def parse_setting(spec: str, base):
    """``LAYER:ALPHA:BETA:GAMMA[:ACT_RATIO][/key=value,...]`` -> ``(layer, WiseConfig, extras)``
    (``extras``: the ``key=value`` settings, typed like the config's fields). A bad entry raises
    ``ValueError`` naming it."""
    from dataclasses import fields

    head, _, tail = spec.partition("/")
    parts = head.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"--settings {spec!r}: expected LAYER:ALPHA:BETA:GAMMA[:ACT_RATIO][/key=value,...]")
    try:
        layer, a, b, g = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        act_ratio = float(parts[4]) if len(parts) == 5 else base.act_ratio
    except ValueError:
        raise ValueError(f"--settings {spec!r}: LAYER must be an integer and the margins numbers") from None
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    extra: dict = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in types or key in ("alpha", "beta", "gamma", "act_ratio"):
            raise ValueError(f"--settings {spec!r}: {item!r} is not key=value with key an editing.wise setting "
                             "other than the margins and act_ratio")
        kind = types[key]
        if value in ("none", "null"):
            extra[key] = None
        elif kind is bool:
            extra[key] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float, str):
            try:
                extra[key] = kind(value)
            except ValueError:
                raise ValueError(f"--settings {spec!r}: {key} must be a {kind.__name__}, got {value!r}") from None
        else:
            raise ValueError(f"--settings {spec!r}: {key} cannot be set here (set it in --config)")
    try:
        wise = replace(base, alpha=a, beta=b, gamma=g, act_ratio=act_ratio, **extra)
    except ValueError as e:
        raise ValueError(f"--settings {spec!r}: {e}") from None
    return layer, wise, extra


if __name__ == "__main__":
    main()
