"""The paper's comparison on one model: {memit, alphaedit, prune, rect, pmet, hse} × {distribute,
boundary} (BLUE), sequential editing rounds, efficacy / generalization / specificity (and fluency).

``pmet`` runs with PMET's published top-1 exit (``top1_nll_factor`` 0.1); ``hse`` is MEMIT with
HSE's options :data:`blueedit.editing.hse.PRESET` (as ``configs/smollm2-135m/hse.yaml``);
``--config-overrides`` scopes use these names. ``--combine`` assembles one table from the JSON
files of separate runs.

The model is loaded once; the edited layers' original ``W_out`` are kept on the CPU and restored
before each run, and one cached ``C_0`` (``--cache-dir``, shared with ``blueedit fit``) serves every
run. ``--dev`` searches λ / v_lr on ``counterfact_dev`` and prints the best setting per method.

    python -m blueedit.bench.quality                       # 100 edits, rounds of 10, 8 runs
    python -m blueedit.bench.quality --dev --num-edits 20 --lams 1500,5000 --v-lrs 0.1,0.5 --methods memit
    python -m blueedit.bench.quality --combine out/memit_distribute.json out/pmet_distribute.json --out out/table
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import torch

from blueedit.bench import harness as C

METRICS = ("efficacy", "generalization", "specificity")


SHORTHANDS = C.shorthands(
    "--layers", "--lam", "--v-lr", "--steps", "--L2", "--nullspace-threshold", "--stats-samples",
    "--stats-max-length", "--stats-corpus")
STATS_DEFAULTS = {"corpus": "wikipedia-sample", "num_samples": 300, "max_length": 256}


def build_parser():
    p = C.benchmark_parser(__doc__, shorthands=SHORTHANDS, stats_defaults=STATS_DEFAULTS)
    C.add_model_options(p)
    p.add_argument("--dataset", default=None, help="edit records (default counterfact_eval; counterfact_dev with --dev)")
    p.add_argument("--num-edits", type=int, default=100)
    p.add_argument("--edits-per-round", type=int, default=10)
    p.add_argument("--methods", default="memit,alphaedit,prune,rect")
    p.add_argument("--strategies", default="distribute,boundary")
    p.add_argument("--config-overrides", nargs="*", default=[], metavar="SCOPE.KEY=VALUE",
                   help="per-run hyperparameters: SCOPE is a method, method:strategy, or '*'; KEY an EditingConfig "
                        "or TargetConfig field (e.g. alphaedit:boundary.L2=1 memit.v_lr=0.3 '*.kl_factor=0.1'); "
                        "or one JSON object {scope: {key: value}}")
    p.add_argument("--fluency", action="store_true", help="also fluency of top-5 sampled generations of 100 tokens counting the "
                   "prompt, as published (slow)")
    p.add_argument("--fluency-records", type=int, default=20, help="records whose generation prompts are used")
    p.add_argument("--dev", action="store_true", help="grid over --lams × --v-lrs on the dev set; print the best")
    p.add_argument("--lams", default="1500", help="λ values for --dev")
    p.add_argument("--v-lrs", default="0.5", help="v_lr values for --dev")
    p.add_argument("--out", default=str(C.RESULTS / "quality"), help="writes <out>.json and <out>.md ('' to skip)")
    p.add_argument("--no-pre-edit", action="store_true",
                   help="skip the evaluation of the unedited model (e.g. runs to be --combine'd with one that has it)")
    p.add_argument("--combine", nargs="+", default=None, metavar="RUN.json",
                   help="only assemble one table (pre-edit row of the first file, then every run) from result files")
    return p


def run_config(base, name: str, strategy: str, overrides: dict, grid: dict | None):
    """The :class:`EditingConfig` of one run of method ``name``: an engine method, or a preset
    (``pmet``, ``hse``; ``harness.method_presets``) whose options are applied before the overrides
    scoped ``*``, ``name`` and ``name:strategy``."""
    engine, edit_opts, target_opts = C.method_presets().get(name, (name, {}, {}))
    if edit_opts or target_opts:
        base = dataclasses.replace(base, **edit_opts, target=dataclasses.replace(base.target, **target_opts))
    scoped = {"*": overrides.get("*", []), engine: overrides.get(name, []),
              f"{engine}:{strategy}": overrides.get(f"{name}:{strategy}", [])}
    return C.scoped_editing_config(base, engine, strategy, scoped, grid)


def hparams_summary(hp) -> dict:
    t = hp.target
    return {"lam": hp.mom2_update_weight, "v_lr": t.v_lr, "steps": t.v_num_grad_steps,
            "compute_dtype": hp.compute_dtype, "top1_nll_factor": t.top1_nll_factor,
            "forget_weight": t.forget_weight, "fisher_weight": t.fisher_weight,
            "fisher_estimator": t.fisher_estimator if t.fisher_weight > 0 else None,
            "history_schedule": hp.history_schedule,
            "L2": hp.L2 if hp.method == "alphaedit" else None,
            "nullspace_threshold": hp.nullspace_threshold if hp.method == "alphaedit" else None,
            "rect_keep": hp.rect_keep if hp.method == "rect" else None, "layers": hp.edited_layers}


# -- statistics ----------------------------------------------------------------------------------
def nullspace_fractions(mom2: dict[int, torch.Tensor], threshold: float) -> dict[int, dict]:
    """Per layer: the fraction of ``C_0``'s eigenvalues below AlphaEdit's threshold (the null-space
    projection's rank / d_k) and the eigenvalue range, so an empty or full projection shows."""
    out = {}
    for l, m in mom2.items():
        c = m.double()
        ev = torch.linalg.eigvalsh((c + c.T) / 2)
        out[l] = {"fraction_below": float((ev < threshold).double().mean()), "rank": int((ev < threshold).sum()),
                  "d_k": int(ev.numel()), "min_eig": float(ev.min()), "median_eig": float(ev.median()),
                  "max_eig": float(ev.max())}
    return out


# -- runs ----------------------------------------------------------------------------------------
def evaluate(model, tok, requests, args, generation_prompts: list[str]) -> dict:
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.evaluation.fluency import fluency_score, generate_sampled

    with C.timed(args.device) as t:
        res = evaluate_requests(model, tok, requests)
        out = {k: res.metrics.get(k, float("nan")) for k in METRICS}
        if args.fluency:
            texts = generate_sampled(model, tok, generation_prompts, max_length=100) if generation_prompts else []
            out["fluency"] = fluency_score(texts)
    out["eval_seconds"] = t["seconds"]
    return out


def run_one(args, hp, bench: C.EditBench, requests, generation_prompts, name: str | None = None) -> dict:
    """Edit ``bench``'s model with ``hp`` over ``requests`` in rounds of ``--edits-per-round``,
    then evaluate it (the caller restores the weights)."""
    from blueedit.editing.setup import build_editor

    model, tok = bench.model, bench.tokenizer
    editor = build_editor(model, tok, hp, adapter=bench.adapter, mom2=bench.mom2, context_templates=bench.templates)
    rounds = [requests[i : i + args.edits_per_round] for i in range(0, len(requests), args.edits_per_round)]
    editor.set_total_rounds(len(rounds))  # n of HSE's schedule
    steps = []
    with C.timed(args.device) as t:
        for i, chunk in enumerate(rounds):
            report = editor.edit_round(chunk, i)
            for v in report.target_steps.values():
                steps += list(v)
        editor.finalize()
    out = {"method": name or hp.method, "strategy": hp.strategy, "hparams": hparams_summary(hp), "seconds": t["seconds"],
           "rounds": len(rounds), "mean_target_steps": sum(steps) / max(len(steps), 1)}
    out.update(evaluate(model, tok, requests, args, generation_prompts))
    out["score"] = sum(out[k] for k in METRICS) / len(METRICS)
    return out


def markdown_table(rows: list[dict], fluency: bool, dev: bool) -> str:
    head = ["method", "strategy"] + (["λ", "v_lr"] if dev else []) + list(METRICS) + (["fluency"] if fluency else []) \
        + (["mean"] if dev else []) + ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    f2 = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    for r in rows:
        cells = [r["method"], r["strategy"]]
        if dev:
            hp = r.get("hparams") or {}
            cells += [f"{hp['lam']:g}" if hp else "-", f"{hp['v_lr']:g}" if hp else "-"]
        cells += [f2(r.get(k)) for k in METRICS]
        if fluency:
            cells.append(f2(r.get("fluency")))
        if dev:
            cells.append(f2(r.get("score")))
        cells.append(f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, model=None, tokenizer=None, requests=None, texts=None) -> dict:
    """Run the comparison and return the results dict.

    ``model``/``tokenizer`` (edited in place, restored afterwards), ``requests`` and ``texts`` (the
    statistics corpus) replace the loaded ones (for tests).
    """
    record = C.RunRecord("quality", argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args, record)
    base, stats = C.benchmark_configs(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or ("counterfact_dev" if args.dev else "counterfact_eval")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    all_hps = run_configs(args, base)  # checked before any slow work
    requests = C.first_requests(dataset, args.num_edits, data_dir, requests)
    generation_prompts = fluency_prompts(args, requests)

    layers = sorted({layer for hp in all_hps.values() for layer in hp.edited_layers})
    bench = C.prepare_edit_bench(args, stats, layers, data_dir=data_dir, model=model, tokenizer=tokenizer, texts=texts)
    thresholds = sorted({hp.nullspace_threshold for hp in all_hps.values() if hp.method == "alphaedit"})
    null = {th: nullspace_fractions({l: bench.mom2[l] for l in layers}, th) for th in thresholds}

    results: dict = {
        "command": record.command, "config": args.as_dict(), "versions": C.versions(),
        "device": C.device_description(args.device),
        "model": bench.model_id if bench.model_id.startswith("given-") else args.model,
        "dataset": dataset, "num_edits": len(requests), "stats_seconds": bench.stats_seconds,
        "nullspace": {str(th): {str(l): v for l, v in per.items()} for th, per in null.items()},
        "runs": [],
    }
    print_nullspace(null)
    results["pre_edit"] = evaluate_pre_edit(args, bench, requests, generation_prompts)
    results["runs"] = run_every_config(args, all_hps, bench, requests, generation_prompts)
    results["table"] = results_table(args, results, stats, null)
    results["run"] = record.as_dict()
    print()
    print(results["table"])
    if args.out:
        write_results(args.out, results)
        print(f"results written to {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}")
    return results


def run_configs(args, base) -> dict:
    """Check and build every run's :class:`EditingConfig`, keyed ``(method, strategy, grid index)``."""
    methods, strategies = C.parse_str_list(args.methods), C.parse_str_list(args.strategies)
    overrides = C.parse_scoped_overrides(args.config_overrides)
    grid = ([{"mom2_update_weight": lam, "v_lr": lr}
             for lam, lr in itertools.product(C.parse_float_list(args.lams), C.parse_float_list(args.v_lrs))]
            if args.dev else [None])
    return {(m, s, i): run_config(base, m, s, overrides, g)
            for m in methods for s in strategies for i, g in enumerate(grid)}


def fluency_prompts(args, requests) -> list[str]:
    """The generation prompts of the first ``--fluency-records`` records (a warning if ``--fluency`` has none)."""
    generation_prompts = [p for r in requests[: args.fluency_records] for p in r.generation_prompts]
    if args.fluency and not generation_prompts:
        print("warning: --fluency but the records have no generation prompts", flush=True)
    return generation_prompts


def print_nullspace(null: dict[float, dict[int, dict]]) -> None:
    """Print each AlphaEdit threshold's null-space ranks, warning about an empty or full projection."""
    for th, per in null.items():
        desc = ", ".join(f"layer {l}: {v['rank']}/{v['d_k']} ({100 * v['fraction_below']:.1f}%)" for l, v in per.items())
        print(f"AlphaEdit null space, eigenvalues of C_0 below {th:g}: {desc}", flush=True)
        for l, v in per.items():
            if v["rank"] == 0 or v["rank"] == v["d_k"]:
                print(f"  warning: layer {l}: the projection is {'empty' if v['rank'] == 0 else 'the identity'} "
                      f"(eigenvalues {v['min_eig']:.2e} .. {v['max_eig']:.2e})", flush=True)


def evaluate_pre_edit(args, bench: C.EditBench, requests, generation_prompts) -> dict:
    """The unedited model's row (NaN metrics with ``--no-pre-edit``)."""
    pre = {"method": "pre-edit", "strategy": "-", "hparams": None, "seconds": None}
    if args.no_pre_edit:
        pre.update({k: float("nan") for k in METRICS})
    else:
        pre.update(evaluate(bench.model, bench.tokenizer, requests, args, generation_prompts))
        print("pre-edit: " + ", ".join(f"{k} {pre[k]:.2f}" for k in METRICS), flush=True)
    pre["score"] = sum(pre[k] for k in METRICS) / len(METRICS)
    return pre


def run_every_config(args, all_hps: dict, bench: C.EditBench, requests, generation_prompts) -> list[dict]:
    """Run every config from the original weights (restored before each and after all); a failure is a row."""
    runs = []
    with bench.restored():
        for (m, s, _), hp in all_hps.items():
            bench.restore()
            try:
                run = run_one(args, hp, bench, requests, generation_prompts, m)
            except Exception as e:  # one failed run (e.g. a solve) should not lose the others
                run = {"method": m, "strategy": s, "hparams": hparams_summary(hp), "seconds": None,
                       "error": f"{type(e).__name__}: {e}", **{k: float("nan") for k in METRICS},
                       "score": float("nan")}
            runs.append(run)
            print(f"{m} ({s}) " + (f"λ {hp.mom2_update_weight:g} v_lr {hp.target.v_lr:g}: " if args.dev else ": ")
                  + (run["error"] if "error" in run else ", ".join(f"{k} {run[k]:.2f}" for k in METRICS)
                     + f", {run['seconds']:.1f} s"), flush=True)
    return runs


def results_table(args, results: dict, stats, null: dict[float, dict[int, dict]]) -> str:
    """The table text: the rows, with ``--dev`` the best setting per method (``results["best"]``), the null space."""
    rows = ([] if args.no_pre_edit else [results["pre_edit"]]) + results["runs"]
    table = markdown_table(rows, args.fluency, args.dev)
    lines = [f"{results['model']}, {results['dataset']}, {results['num_edits']} edits in rounds of "
             f"{args.edits_per_round}, C_0 from {stats.num_samples} {stats.corpus} texts", "", table]
    if args.dev:
        best = {}
        for r in results["runs"]:
            key = (r["method"], r["strategy"])
            if not math.isnan(r["score"]) and (key not in best or r["score"] > best[key]["score"]):
                best[key] = r
        results["best"] = [{"method": k[0], "strategy": k[1], **v["hparams"], "score": v["score"]}
                           for k, v in best.items()]
        lines += ["", "Best by mean(efficacy, generalization, specificity):"]
        lines += [f"- {b['method']} ({b['strategy']}): λ {b['lam']:g}, v_lr {b['v_lr']:g} -> {b['score']:.2f}"
                  for b in results["best"]]
    for th, per in null.items():
        lines += ["", f"AlphaEdit null space (eigenvalues of C_0 below {th:g}): "
                  + ", ".join(f"layer {l} {100 * v['fraction_below']:.1f}%" for l, v in per.items())]
    return "\n".join(lines)


def write_results(out: str | Path, results: dict) -> None:
    """``<out>.json`` (everything) and ``<out>.md`` (the table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(results["table"] + "\n")


def combine(args, record: C.RunRecord) -> dict:
    """One table from the result files of separate runs (e.g. one run per method, each under the
    shared lock): the first file's pre-edit row, then every file's runs, in the order given."""
    files = [json.loads(Path(f).read_text()) for f in args.combine]
    first = files[0]
    fluency = any("fluency" in r for f in files for r in f["runs"])
    rows = [first["pre_edit"]] + [r for f in files for r in f["runs"]]
    cfg = first["config"]
    stats = cfg.get("stats") or {"num_samples": cfg.get("stats_samples"), "corpus": cfg.get("stats_corpus")}
    lines = [f"{first['model']}, {first['dataset']}, {first['num_edits']} edits in rounds of {cfg['edits_per_round']}, "
             f"C_0 from {stats['num_samples']} {stats['corpus']} texts", "", markdown_table(rows, fluency, False)]
    results = {"command": record.command, "sources": list(args.combine),
               "commands": [f["command"] for f in files], "pre_edit": first["pre_edit"],
               "runs": [r for f in files for r in f["runs"]], "table": "\n".join(lines),
               "run": record.as_dict()}
    print(results["table"])
    if args.out:
        write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
