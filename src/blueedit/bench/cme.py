"""Compositional model editing (CME) on SmolLM2-135M: A³E's ladder and mask rules, oracle and
retrieved routing, on MAC (k = 2, 3) and MQC built from PEAK-CF; optionally A³E against WISE on
the ordinary CounterFact / zsRE metrics (docs/algorithms.md, "A³E").

Steps: (1) build the compositions of the chosen split (``blueedit.data.compositions``; MAC answers
the unedited model misses in its greedy 30-token continuation of the bare question), written to
``--cme-dir`` (derived data: never committed); (2) the unedited model's generations; (3) for each
A³E variant, one store per task holding the adapters of every edit of that task (N = k × the
compositions), then every composition is asked with ``oracle`` routing (its own edits) and with
``retrieve`` routing (the key store over the whole task's store); (4) ``--table3``: the first
``--table3-num-edits`` records of ``counterfact_eval`` and ``zsre_eval`` edited one at a time with A³E
(retrieve) and with WISE (``configs/smollm2-135m/wise.yaml``), scored by the existing evaluator.

Variants (``--variants``): ``a`` adapters alone (no mask, α = β = 0, sum merge), ``b`` + mask,
``c`` + L_c and L_o, ``d`` + sign merge (full A³E); ``highest`` and ``abs``: the full method with
those mask rules. Written under ``--out``: ``cme.json`` (every composition's generations and
scores, the command, versions, times) and ``cme.md`` (tables with 95 % bootstrap intervals).

The committed tables (``benchmarks/results/a3e_cme/``; the full method, row (d), of the ladder is in
the first one)::

    python -m blueedit.bench.cme --num-compositions 8 --tasks mac_k2 mac_k3 mqc --variants d \
        --baselines memit memit_blue alphaedit alphaedit_blue wise --max-new-tokens 20 --rephrased 1 \
        --unrelated 2 --name cme_table1
    python -m blueedit.bench.cme --num-compositions 8 --tasks mac_k2 --variants a b c highest abs \
        --max-new-tokens 20 --rephrased 1 --unrelated 2 --name cme_table2
    python -m blueedit.bench.cme --num-compositions 8 --tasks mac_k2 --variants --table3 \
        --table3-num-edits 20 --max-new-tokens 20 --rephrased 1 --unrelated 2 --name cme_table3
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blueedit.bench import harness as C

TASKS = ("mac_k2", "mac_k3", "mqc")
VARIANTS = {
    "a": dict(mask="none", alpha=0.0, beta=0.0, merge="sum"),
    "b": dict(mask="lowest", alpha=0.0, beta=0.0, merge="sum"),
    "c": dict(mask="lowest", merge="sum"),
    "d": dict(mask="lowest", merge="sign"),
    "highest": dict(mask="highest", merge="sign"),
    "abs": dict(mask="abs", merge="sign"),
}
BASELINES = ("memit", "memit_blue", "alphaedit", "alphaedit_blue", "wise")
LABELS = {"memit": "MEMIT", "memit_blue": "MEMIT + BLUE", "alphaedit": "AlphaEdit", "alphaedit_blue": "AlphaEdit + BLUE",
          "wise": "WISE", "a": "(a) adapters alone (MELO-like)", "b": "(b) + mask (lowest)", "c": "(c) + L_c, L_o",
          "d": "(d) + sign merge = A³E", "highest": "A³E, mask highest", "abs": "A³E, mask abs"}


def build_parser():
    """The command line of the benchmark."""
    p = C.plain_parser(__doc__.split("\n")[0])
    p.add_argument("--config", default=str(C.REPO / "configs" / "smollm2-135m" / "a3e.yaml"))
    p.add_argument("--split", default="report", choices=("dev", "report"))
    p.add_argument("--num-compositions", type=int, default=20, help="compositions per task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="the PEAK-built tasks to run")
    p.add_argument("--variants", nargs="*", default=["a", "b", "c", "d"], choices=list(VARIANTS))
    p.add_argument("--baselines", nargs="*", default=[], choices=BASELINES,
                   help="also these methods (configs/smollm2-135m/<method>.yaml, with configs/blue.yaml for _blue), "
                        "each composition on a fresh model")
    p.add_argument("--name", default="cme", help="stem of the output files")
    p.add_argument("--routing", nargs="+", default=["oracle", "retrieve"], choices=("oracle", "retrieve"))
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--rephrased", type=int, default=2, help="rephrased queries asked per composition (at most)")
    p.add_argument("--unrelated", type=int, default=4, help="unrelated prompts asked per composition (at most)")
    p.add_argument("--table3", action="store_true", help="also A³E vs WISE on counterfact_eval and zsre_eval")
    p.add_argument("--table3-num-edits", type=int, default=20)
    p.add_argument("--compositions", nargs="+", default=None, metavar="TASK=FILE",
                   help="your own composition records (the JSON format of blueedit.data.compositions) instead "
                        "of the PEAK build, e.g. mine=my_records.json")
    p.add_argument("--cme-dir", default=None, help="where the built compositions go (default: the blueedit cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(C.RESULTS / "a3e_cme"))
    return p


@dataclass
class Progress:
    """The results so far (scores per row and task, seconds per edit, times), rewritten after every task."""

    args: Any
    record: C.RunRecord
    comps: dict[str, list]
    results: dict[str, dict]
    edit_seconds: dict[str, float]
    times: dict[str, float]

    def write(self, table3: dict | None = None) -> None:
        """Write ``<name>.json``, ``<name>.md`` and the run record as they stand."""
        write(self.args, self.record, self.comps, self.results, self.edit_seconds, table3, self.times)


def main(argv: list[str] | None = None) -> None:
    """Build the compositions, score the unedited model, run every variant and baseline, write the tables."""
    record = C.RunRecord("cme", argv)
    args = build_parser().parse_args(argv)

    import torch
    import yaml

    from blueedit.memory.a3e import A3EConfig
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    paths = check_user_compositions(args) if args.compositions else None  # before the model is loaded
    cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    base = A3EConfig(**cfg["editing"]["a3e"])
    layer = int(cfg["editing"]["layers"][0])
    cache = os.environ.get("BLUEEDIT_CACHE")
    lm, tok = load_model_and_tokenizer(ModelConfig(**cfg["model"]), cache)
    lm.eval()

    comps, t0, build_seconds = build_compositions(args, lm, tok, cache, paths)  # (1)
    pre, unedited = generate_unedited(args, lm, tok, comps)  # (2)
    times = {"build": build_seconds, "unedited": time.perf_counter() - t0 - build_seconds}
    print(f"built and scored the unedited model in {time.perf_counter() - t0:.0f} s", flush=True)
    progress = Progress(args, record, comps, {"unedited": unedited}, {}, times)
    run_variants(progress, lm, tok, base, layer, pre)  # (3)
    run_baselines(progress, lm, tok, pre, cache)

    table3 = run_table3(lm, tok, cfg, base, layer, args.table3_num_edits) if args.table3 else None  # (4)
    times["total"] = time.perf_counter() - t_start
    progress.write(table3)


def check_user_compositions(args) -> dict[str, Path]:
    """Check every record of ``--compositions`` and set ``args.tasks``: the files by ``<task>_<split>``."""
    from blueedit.data.compositions import load_compositions

    paths = dict(_user_files(args.compositions, args.split))
    args.tasks = [k[: -len(args.split) - 1] for k in paths]
    for path in paths.values():
        try:
            load_compositions(path)
        except ValueError as e:
            raise SystemExit(f"--compositions: {e}") from None
    return paths


def build_compositions(args, lm, tok, cache, paths: dict[str, Path] | None) -> tuple[dict[str, list], float, float]:
    """The compositions per task, cut to ``--rephrased`` / ``--unrelated``; when the build started, its seconds."""
    from blueedit.data.compositions import build_cme, load_compositions
    from blueedit.evaluation.compositional import greedy_generate

    cme_dir = Path(args.cme_dir or Path(cache or Path.home() / ".cache" / "blueedit") / "cme")
    known_path = cme_dir / "base_continuations.json"  # the unedited model's 30-token continuations
    known: dict[str, str] = json.loads(known_path.read_text()) if known_path.is_file() else {}

    def missed(question: str, answer: str) -> bool:
        from blueedit.evaluation.compositional import answer_position

        if question not in known:
            known[question] = greedy_generate(lm, tok, question, 30, stop=None)
        return answer_position(known[question], answer) < 0

    t0 = time.perf_counter()
    if paths is None:
        paths = build_cme(C.default_data_dir(), cme_dir, {args.split: args.num_compositions}, missed=missed, tasks=tuple(args.tasks))
    build_seconds = time.perf_counter() - t0
    if known:
        known_path.write_text(json.dumps(known))
    comps = {t: [replace(c, rephrased_queries=c.rephrased_queries[:args.rephrased],
                         unrelated_prompts=c.unrelated_prompts[:args.unrelated])
                 for c in load_compositions(paths[f"{t}_{args.split}"])] for t in args.tasks}
    return comps, t0, build_seconds


def generate_unedited(args, lm, tok, comps: dict[str, list]) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The unedited model's generations for every composition, and their scores (per task)."""
    from blueedit.evaluation.compositional import greedy_generate

    gen = lambda prompt, n=args.max_new_tokens: greedy_generate(lm, tok, prompt, n)  # noqa: E731
    pre = {t: [{"query": gen(c.query), "rephrased": [gen(q) for q in c.rephrased_queries],
                "unrelated": [gen(q) for q in c.unrelated_prompts]} for c in cs] for t, cs in comps.items()}
    return pre, {t: [_score_unedited(c, pr) for c, pr in zip(cs, pre[t])] for t, cs in comps.items()}


def run_variants(progress: Progress, lm, tok, base, layer: int, pre: dict[str, list[dict]]) -> None:
    """Run every A³E variant on every task, each routing scored, the results written after each task."""
    args = progress.args
    for v in args.variants:
        a3e = replace(base, **VARIANTS[v])
        for t, cs in progress.comps.items():
            t1 = time.perf_counter()
            rows, secs = run_variant(lm, tok, a3e, layer, cs, pre[t], args.routing, args.max_new_tokens)
            for routing, r in rows.items():
                progress.results.setdefault(f"{v}/{routing}", {})[t] = r
            progress.edit_seconds[f"{v}/{t}"] = secs
            progress.times[f"{v}/{t}"] = time.perf_counter() - t1
            print(f"{v} {t}: {secs:.2f} s/edit, {time.perf_counter() - t1:.0f} s", flush=True)
            progress.write()  # what is done so far


def run_baselines(progress: Progress, lm, tok, pre: dict[str, list[dict]], cache) -> None:
    """Run every ``--baselines`` method on every task, the results written after each task."""
    results, edit_seconds, times = progress.results, progress.edit_seconds, progress.times
    for name in progress.args.baselines:
        for t, cs in progress.comps.items():
            t1 = time.perf_counter()
            results.setdefault(f"{name}/-", {})[t], edit_seconds[f"{name}/{t}"] = run_baseline(
                lm, tok, name, cs, pre[t], progress.args.max_new_tokens, cache)
            times[f"{name}/{t}"] = time.perf_counter() - t1
            print(f"{name} {t}: {edit_seconds[f'{name}/{t}']:.2f} s/edit, {times[f'{name}/{t}']:.0f} s", flush=True)
            progress.write()


def _user_files(items: list[str], split: str):
    for item in items:
        task, eq, path = item.partition("=")
        if not eq or not task or not Path(path).is_file():
            raise SystemExit(f"--compositions {item!r}: expected TASK=FILE with an existing file")
        yield f"{task}_{split}", Path(path)


def _score_unedited(c, pr: dict) -> dict:
    from blueedit.evaluation.compositional import CompositionOutputs, score

    out = CompositionOutputs(pr["query"], pr["rephrased"], pr["unrelated"], pr["unrelated"], [], [])
    return {"id": c.id, **score(c.answers, c.ordered, out), "query_out": pr["query"]}


def run_variant(lm, tok, a3e, layer: int, comps, pre: list[dict], routings: list[str], max_new: int):
    """Train one store with every edit of ``comps``, then score each composition per routing."""
    from blueedit.evaluation.compositional import CompositionOutputs, first_token_ranks, score
    from blueedit.memory.a3e import A3EEditor

    editor = A3EEditor(lm, tok, a3e, layer=layer)
    index: list[list[int]] = []
    t0 = time.perf_counter()
    try:
        for c in comps:
            index.append(editor.edit(list(c.edits)))
        per_edit = (time.perf_counter() - t0) / max(1, editor.state.num_edits)
        rows: dict[str, list[dict]] = {}
        for routing in routings:
            editor.cfg = replace(a3e, routing=routing)  # inference only: the store is the same
            out_rows = []
            for c, ids, pr in zip(comps, index, pre):
                oracle = routing == "oracle"
                gen = lambda prompt, edits, n=max_new, first=None, oracle=oracle: editor.generate(  # noqa: E731
                    prompt, n, edits=edits if oracle else None, first_logits=first)
                first: list = []
                query = gen(c.query, ids, first=first)
                outs = CompositionOutputs(
                    query, [gen(q, ids) for q in c.rephrased_queries], [gen(q, ids) for q in c.unrelated_prompts],
                    pr["unrelated"], [gen(e.filled_prompt, [i], 12) for e, i in zip(c.edits, ids)],
                    first_token_ranks(first[0], tok, c.answers))
                out_rows.append({"id": c.id, **score(c.answers, c.ordered, outs), "query_out": query,
                                 "routed": ids if oracle else editor.retrieved(c.query)})
            rows[routing] = out_rows
    finally:
        editor.remove()
    return rows, per_edit


def run_baseline(lm, tok, name: str, comps, pre: list[dict], max_new: int, cache) -> tuple[list[dict], float]:
    """Each composition's edits as one round on the unedited model (restored after), then scored."""
    import yaml

    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.setup import build_editor, cached_key_statistics
    from blueedit.editing.statistics import StatsConfig
    from blueedit.editing.targets import TargetConfig, generate_context_templates
    from blueedit.editing.wise import WiseConfig, WiseEditor, irrelevant_inputs, wise_context_templates
    from blueedit.evaluation.compositional import CompositionOutputs, first_token_ranks, greedy_generate, score
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, model_fingerprint

    method = name.removesuffix("_blue")
    cfg = yaml.safe_load((C.REPO / "configs" / "smollm2-135m" / f"{method}.yaml").read_text())["model"]
    ed = dict(cfg["editing"])
    if name != method:  # + BLUE: the method config composed with configs/blue.yaml
        ed.update(yaml.safe_load((C.REPO / "configs" / "blue.yaml").read_text())["model"]["editing"])
    hp = EditingConfig(**{k: v for k, v in ed.items() if k not in ("target", "wise")},
                       target=TargetConfig(**ed.get("target", {})), wise=WiseConfig(**ed.get("wise", {})))
    adapter = ModelAdapter(lm)
    if hp.method == "wise":
        from blueedit.data.formats import load_requests

        pool = irrelevant_inputs(load_requests(hp.wise.irrelevant_dataset))
        templates = wise_context_templates(lm, tok, hp.wise.context_lengths)
        make = lambda: WiseEditor(lm, tok, adapter, hp, templates, pool)  # noqa: E731
    else:
        mom2 = cached_key_statistics(lm, tok, hp.edited_layers, StatsConfig(**cfg.get("stats", {})),
                                     model_id=model_fingerprint(ModelConfig(**cfg["model"])), adapter=adapter,
                                     data_dir=C.default_data_dir(), cache_dir=cache, progress=False)
        templates = generate_context_templates(lm, tok)
        make = lambda: build_editor(lm, tok, hp, adapter=adapter, mom2=mom2, context_templates=templates,  # noqa: E731
                                    progress=False)
    original = {l: adapter.get_w_out(l).clone() for l in hp.edited_layers}
    gen = lambda prompt, n=max_new, first=None: greedy_generate(lm, tok, prompt, n, first_logits=first)  # noqa: E731
    rows, seconds, edits = [], 0.0, 0
    for c, pr in zip(comps, pre):
        editor = make()
        t0 = time.perf_counter()
        editor.edit_round(list(c.edits), 0)
        seconds, edits = seconds + time.perf_counter() - t0, edits + c.k
        try:
            first: list = []
            query = gen(c.query, first=first)
            outs = CompositionOutputs(query, [gen(q) for q in c.rephrased_queries],
                                      [gen(q) for q in c.unrelated_prompts], pr["unrelated"],
                                      [gen(e.filled_prompt, 12) for e in c.edits],
                                      first_token_ranks(first[0], tok, c.answers))
            rows.append({"id": c.id, **score(c.answers, c.ordered, outs), "query_out": query})
        finally:
            if hp.method == "wise":
                editor.remove()
            for l, w in original.items():
                adapter.set_w_out(l, w)
    return rows, seconds / max(1, edits)


def run_table3(lm, tok, cfg, a3e, layer: int, n: int) -> dict:
    """A³E (retrieve) and WISE, edits one at a time, on counterfact_eval and zsre_eval."""
    import yaml

    from blueedit.data.formats import load_requests
    from blueedit.editing.editor import EditingConfig
    from blueedit.editing.wise import WiseConfig, WiseEditor, irrelevant_inputs, wise_context_templates
    from blueedit.evaluation.editing_metrics import add_locality, evaluate_requests
    from blueedit.memory.a3e import A3EEditor
    from blueedit.models.adapters import ModelAdapter

    wise_cfg = yaml.safe_load((C.REPO / "configs" / "smollm2-135m" / "wise.yaml").read_text())["model"]["editing"]
    wise = WiseConfig(**wise_cfg["wise"])
    adapter = ModelAdapter(lm)
    out = {}
    for dataset in ("counterfact_eval", "zsre_eval"):
        requests = load_requests(dataset, num_edits=n)
        pre = evaluate_requests(lm, tok, requests)
        rows = {}
        for method in ("a3e", "wise"):
            t0 = time.perf_counter()
            if method == "a3e":
                editor = A3EEditor(lm, tok, replace(a3e, routing="retrieve"), layer=layer, adapter=adapter)
                for r in requests:
                    editor.edit([r])
            else:
                hp = EditingConfig(method="wise", layers=list(wise_cfg["layers"]), wise=wise)
                pool = load_requests(wise.irrelevant_dataset)
                editor = WiseEditor(lm, tok, adapter, hp, wise_context_templates(lm, tok, wise.context_lengths),
                                    irrelevant_inputs(pool, {q for r in requests for q in r.neighborhood}))
                for i, r in enumerate(requests):
                    editor.edit_round([r], i)
            secs = (time.perf_counter() - t0) / n
            post = evaluate_requests(lm, tok, requests)
            add_locality(post, pre)
            editor.remove()
            rows[method] = {"metrics": post.metrics, "seconds_per_edit": secs}
            print(dataset, method, json.dumps(post.metrics), flush=True)
        out[dataset] = {"pre": pre.metrics, "rows": rows}
    return out


def write(args, record, comps, results, edit_seconds, table3, times) -> None:
    from blueedit.evaluation.compositional import summarize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = record.command
    summary = {name: {t: summarize(rows) for t, rows in per_task.items()} for name, per_task in results.items()}
    (out / f"{args.name}.json").write_text(json.dumps({
        "command": command, "split": args.split, "num_compositions": args.num_compositions, "tasks": args.tasks, "variants": args.variants,
        "compositions": {t: len(cs) for t, cs in comps.items()}, "summary": summary, "rows": results,
        "seconds_per_edit": edit_seconds, "table3": table3, "times": times, "device": C.device_description("cpu"),
        "run": record.as_dict()}, indent=1, default=str))
    record.write(out, shared=True)  # the directory holds several runs' tables
    lines = [f"Compositional editing on SmolLM2-135M-Instruct, PEAK-CF `{args.split}` split, "
             f"{', '.join(f'{t} {len(cs)}' for t, cs in comps.items())} compositions; greedy, at most "
             f"{args.max_new_tokens} tokens, cut at the first newline. Rates in %, [95 % bootstrap interval]; "
             "failure counts are totals over the compositions (loss / preceding / sinking).", ""]
    for t in comps:
        lines += [f"### {t}", "", "| method | routing | SR-S | SR-1 | GSR | LSR | loss | preceding | sinking | s / edit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, per_task in summary.items():
            if t not in per_task:
                continue
            s = per_task[t]
            v, _, routing = name.partition("/")
            cell = lambda k, s=s: f"{s[k]['mean']:.1f} [{s[k]['low']:.0f}, {s[k]['high']:.0f}]"  # noqa: E731
            secs = edit_seconds.get(f"{v}/{t}")
            lines.append(f"| {LABELS.get(v, v)} | {routing or '-'} | {cell('sr_s')} | {cell('sr_1')} | {cell('gsr')} | "
                         f"{cell('lsr')} | {s['loss']['total']:.0f} | {s['preceding']['total']:.0f} | "
                         f"{s['sinking']['total']:.0f} | {'-' if secs is None else f'{secs:.2f}'} |")
        lines.append("")
    if table3:
        lines += ["### CounterFact / zsRE (edits one at a time, retrieve routing for A³E)", "",
                  "| dataset | method | efficacy | generalization | specificity / locality | s / edit |",
                  "|---|---|---:|---:|---:|---:|"]
        for dataset, d in table3.items():
            for method, r in d["rows"].items():
                m = r["metrics"]
                spec = m.get("locality", m.get("specificity", float("nan")))
                lines.append(f"| {dataset} | {method} | {m.get('efficacy', float('nan')):.1f} | "
                             f"{m.get('generalization', float('nan')):.1f} | {spec:.1f} | {r['seconds_per_edit']:.2f} |")
        lines.append("")
    if args.baselines:
        lines.append("Baselines: each composition's edits are one round on the unedited model (restored after); "
                     "their *loss* counter asks each edit's prompt with all the composition's edits applied.")
    done = "" if "total" in times else " (so far; the run goes on)"
    lines.append(f"Wall time {(times.get('total') or sum(times.values())) / 60:.1f} min{done} on "
                 f"{C.device_description('cpu')}.")
    (out / f"{args.name}.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
