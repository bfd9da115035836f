"""Plain prompts vs the chat template (``model.chat_template``) on an instruct model.

Runs ``blueedit fit --config CONFIG`` twice on the same records, once with the plain prompts and
once with every prompt (editing and evaluation) in the tokenizer's chat template, and writes the
pre/post efficacy, generalization and specificity of both to ``<out>.md`` and ``<out>.json``.
The two runs score different prompts (plain vs chat-formatted), so each row's pre-edit numbers are
its own baseline.

    python -m blueedit.bench.chat_template --config configs/smollm2-135m/memit.yaml \\
        --num-edits 20 --out benchmarks/results/locate/chat_vs_plain
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from blueedit.bench import harness as C

METRICS = ("efficacy", "generalization", "specificity")


def main(argv=None) -> dict:
    from blueedit.cli import run_cli

    record = C.RunRecord("chat_template", argv)
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m/memit.yaml")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--edits-per-round", type=int, default=10)
    p.add_argument("--root", default="runs/chat_template")
    p.add_argument("--out", default=str(C.RESULTS / "locate" / "chat_vs_plain"))
    p.add_argument("--override", action="append", default=[], help="extra CLI options for both runs")
    args = p.parse_args(argv)
    results = {}
    for name, chat in (("plain", False), ("chat template", True)):
        t0, c0 = time.perf_counter(), time.process_time()
        cli = run_cli(["fit", "--config", args.config, f"--data.num_edits={args.num_edits}",
                       f"--data.edits_per_round={args.edits_per_round}", f"--model.model.chat_template={str(chat).lower()}",
                       f"--trainer.default_root_dir={args.root}/{'chat' if chat else 'plain'}",
                       "--trainer.enable_progress_bar=false", *args.override])
        pre, post = cli.model.pre_metrics["metrics"], cli.model.post_metrics["metrics"]
        results[name] = {m: {"pre": pre[m], "post": post[m]} for m in METRICS}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        results[name]["cpu_seconds"] = round(time.process_time() - c0, 1)
        example = cli.model.as_prompted(cli.datamodule.requests[:1])[0]
        results[name]["example_prompt"] = example.filled_prompt
        # the edited model scored in the other format (a chat user of a plain-edited model, and back)
        cli.model.model_spec.chat_template = not chat
        other = cli.model.run_evaluation().to_dict()["metrics"]
        results[name]["post_other_format"] = {m: other[m] for m in METRICS}
    cmd = record.command
    lines = [f"{args.config}, {args.num_edits} CounterFact edits in rounds of {args.edits_per_round}: plain prompts vs "
             "the chat template (`model.chat_template: true`) for editing and evaluation", "",
             "| edited and evaluated with | efficacy pre → post | generalization pre → post | specificity pre → post | "
             "seconds (CPU) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [f"{r[m]['pre']:.2f} → {r[m]['post']:.2f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']} ({r['cpu_seconds']}) |")
    lines += ["", "The same edited models evaluated in the other format (post-edit):", "",
              "| edited with | evaluated with | efficacy | generalization | specificity |", "|---|---|---|---|---|"]
    for name, r in results.items():
        other = "chat template" if name == "plain" else "plain"
        lines.append(f"| {name} | {other} | " + " | ".join(f"{r['post_other_format'][m]:.2f}" for m in METRICS) + " |")
    lines += ["", "Edited prompt as the model saw it:", ""]
    for name, r in results.items():
        lines.append(f"- {name}: `{json.dumps(r['example_prompt'])[1:-1]}`")
    lines += ["", f"Command: `{cmd.strip()}`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({**results, "run": record.as_dict()}, indent=1) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
