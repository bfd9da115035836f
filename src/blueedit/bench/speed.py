"""Speed of the optimized path (``editing.optimize: true``) against the reference path.

For each mode, in one process and on a freshly loaded model: (a) the key statistics ``C_0`` for
every edited layer, collected into a fresh temporary cache (one pass for all layers when
optimized, one pass per layer for the reference), (b) sequential editing rounds with
:class:`~blueedit.editing.editor.Editor`, (c) peak memory of each phase, (d) the final efficacy /
generalization / specificity on the edited records, which should agree between the modes.

    python -m blueedit.bench.speed                        # SmolLM2-135M on CPU, 20 edits
    python -m blueedit.bench.speed --random-init-config llama3-8b --dtype bfloat16 --device cuda \\
        --num-edits 100 --edits-per-round 100

Prints a Markdown table (reference / optimized ratio per row) and writes JSON to ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from blueedit.bench import harness as C

MODES = ("optimized", "reference", "optimized-bf16")
#: ratio columns of the table: (numerator mode, denominator mode)
RATIOS = (("reference", "optimized"), ("optimized", "optimized-bf16"), ("reference", "optimized-bf16"))

#: (key, label, unit formatter) of the table rows.
ROWS = [
    ("stats_seconds", "statistics: seconds (all edited layers)", "{:.2f}"),
    ("stats_tokens_per_s", "statistics: corpus tokens / s", "{:.0f}"),
    ("stats_peak_mb", "statistics: peak memory (MiB)", "{:.0f}"),
    ("stats_delta_mb", "statistics: memory increase (MiB)", "{:.0f}"),
    ("edit_seconds", "editing: seconds (all rounds)", "{:.2f}"),
    ("seconds_per_edit", "editing: seconds / edit", "{:.3f}"),
    ("seconds_per_round", "editing: seconds / round", "{:.2f}"),
    ("cpu_seconds_per_edit", "editing: CPU seconds / edit (all threads)", "{:.3f}"),
    ("mean_target_steps", "editing: mean target steps", "{:.1f}"),
    ("edit_peak_mb", "editing: peak memory (MiB)", "{:.0f}"),
    ("edit_delta_mb", "editing: memory increase (MiB)", "{:.0f}"),
    ("efficacy", "efficacy (%)", "{:.2f}"),
    ("generalization", "generalization (%)", "{:.2f}"),
    ("specificity", "specificity (%)", "{:.2f}"),
]


SHORTHANDS = C.shorthands(
    "--method", "--strategy", "--layers", "--steps", "--v-lr", "--loss-layer", "--lam", "--stats-samples",
    "--stats-max-length", "--stats-batch-size")


def build_parser():
    """Per-mode settings (``optimize``, ``compute_dtype``, ``max_batch_tokens``, ``autocast``)
    come from the mode and the options below; the rest from ``--editing.*`` / ``--stats.*``."""
    p = C.benchmark_parser(__doc__, shorthands=SHORTHANDS,
                           stats_defaults={"corpus": "wikipedia-sample", "num_samples": 100, "max_length": 256})
    p.add_argument("--model", default="smollm2-135m", help="model to load (ignored with --random-init-config)")
    p.add_argument("--random-init-config", default=None, choices=sorted(C.RANDOM_CONFIGS),
                   help="build a randomly initialized Llama of this shape instead of loading weights")
    p.add_argument("--dataset", default="counterfact_eval", help="edit records (a load_requests source)")
    p.add_argument("--num-edits", type=int, default=20, help="number of edit records")
    p.add_argument("--edits-per-round", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", default="none", choices=["none", "bfloat16", "float16"])
    p.add_argument("--compute-dtype", default="none", choices=["none", "float32", "bfloat16", "float16"],
                   help="editing.compute_dtype of the optimized mode (forward passes on a copy in this dtype)")
    p.add_argument("--reference-compute-dtype", default="none", choices=["none", "float32", "bfloat16", "float16"],
                   help="editing.compute_dtype of the reference mode")
    p.add_argument("--max-batch-tokens", type=int, default=1024,
                   help="editing.max_batch_tokens of the optimized mode (0: one batch)")
    p.add_argument("--flops", action="store_true",
                   help="count the FLOPs of one target step and compare with measured matmul peaks")
    p.add_argument("--profile", action="store_true",
                   help="split the optimized modes' editing time into phases (blueedit.bench.round_profile) and "
                        "compare each phase's linear-layer FLOP rate with measured bf16 matmul rates")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--modes", default="optimized,reference", help="comma-separated subset of optimized,reference")
    p.add_argument("--data-dir", default=None, help="benchmark data (default $BLUEEDIT_DATA_DIR or ../shared/data)")
    p.add_argument("--cache-dir", default=None, help="cache root for converted models (default ~/.cache/blueedit)")
    p.add_argument("--out", default=str(C.RESULTS / "speed.json"), help="JSON output ('' to skip writing)")
    return p


def _mb(n: int) -> float:
    return n / 2**20


def run_mode(mode: str, args, make_model, requests, texts, model_id: str) -> tuple[dict, dict[int, torch.Tensor]]:
    """One mode on a fresh model: statistics, editing, memory, metrics."""
    from dataclasses import replace

    from blueedit.editing.setup import build_editor
    from blueedit.editing.statistics import StatisticsCache
    from blueedit.editing.targets import generate_context_templates
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.models.adapters import ModelAdapter

    optimize = mode.startswith("optimized")
    model, tok = make_model()
    adapter = ModelAdapter(model)
    compute = {"optimized": args.compute_dtype, "reference": args.reference_compute_dtype,
               "optimized-bf16": "bfloat16"}[mode]
    hp = replace(
        args.base, optimize=optimize,
        autocast=None if args.autocast == "none" else args.autocast,
        compute_dtype=None if compute == "none" else compute,
        max_batch_tokens=(args.max_batch_tokens or None) if optimize else None,
    )
    adapter.check_layers(hp.layers)
    layers = hp.edited_layers
    out: dict = {"mode": mode, "edited_layers": layers}

    # (a) statistics, into a fresh temporary cache so nothing is loaded from disk
    # (the component itself, timed: not blueedit.editing.setup.cached_key_statistics, which reads the cache)
    spec = replace(args.stats_config, dtype="float32")
    corpus_id = f"speed-benchmark-n{spec.num_samples}"
    with tempfile.TemporaryDirectory(prefix="blueedit-speed-") as tmp:
        cache = StatisticsCache(tmp, model_id, checkpoint_every=10**9)
        with C.PeakMemory(args.device) as mem, C.timed(args.device) as t:
            stats = cache.get_or_collect(model, adapter, tok, layers, spec, corpus_id, lambda: texts,
                                         single_pass=optimize)
    tokens = next(iter(stats.values())).count
    out.update(stats_seconds=t["seconds"], stats_tokens=tokens, stats_passes=1 if optimize else len(layers),
               stats_tokens_per_s=tokens / max(t["seconds"], 1e-9),
               stats_peak_mb=_mb(mem.peak_bytes), stats_delta_mb=_mb(mem.delta_bytes), memory_method=mem.method)
    mom2 = {l: s.mom2 for l, s in stats.items()}

    # (b) editing rounds
    with C.timed(args.device) as t_templates:
        templates = generate_context_templates(model, tok)
    editor = build_editor(model, tok, hp, adapter=adapter, mom2=mom2, context_templates=templates)
    rounds = [requests[i : i + args.edits_per_round] for i in range(0, len(requests), args.edits_per_round)]
    from blueedit.bench.round_profile import RoundProfile

    prof = RoundProfile() if args.profile and optimize else contextlib.nullcontext()
    with C.PeakMemory(args.device) as mem, C.timed(args.device) as t, prof:
        round_seconds, steps = edit_rounds(editor, rounds, mode, args.device)
    out.update(templates_seconds=t_templates["seconds"], edit_seconds=t["seconds"], rounds=len(rounds),
               round_seconds=round_seconds, seconds_per_round=sum(round_seconds) / len(rounds),
               seconds_per_edit=t["seconds"] / len(requests), cpu_seconds_per_edit=t["cpu_seconds"] / len(requests),
               mean_target_steps=sum(sum(v) for v in steps.values()) / max(sum(len(v) for v in steps.values()), 1),
               mean_target_steps_per_layer={l: sum(v) / len(v) for l, v in steps.items() if v},
               edit_peak_mb=_mb(mem.peak_bytes), edit_delta_mb=_mb(mem.delta_bytes))

    if isinstance(prof, RoundProfile):
        out["profile"] = profile_summary(prof, t["cpu_seconds"], hp, model.config)
    if args.flops and optimize:
        out.update(target_step_flops(editor, requests[: args.edits_per_round], hp))

    # (d) metrics on the edited records
    with C.timed(args.device) as t_eval:
        res = evaluate_requests(model, tok, requests)
    out.update({k: res.metrics.get(k, float("nan")) for k in ("efficacy", "generalization", "specificity")})
    out["eval_seconds"] = t_eval["seconds"]
    mom2_cpu = {l: m.detach().float().cpu() for l, m in mom2.items()}
    del editor, model, adapter, mom2
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return out, mom2_cpu


def edit_rounds(editor, rounds, mode: str, device: str) -> tuple[list[float], dict[str, list[int]]]:
    """Run the rounds and finalize: each round's seconds and every request's target steps, by layer."""
    round_seconds, steps = [], {}
    for i, chunk in enumerate(rounds):
        with C.timed(device) as t_round:
            report = editor.edit_round(chunk, i)
        round_seconds.append(t_round["seconds"])
        for layer, per_layer in report.target_steps.items():
            steps.setdefault(str(layer), []).extend(per_layer)
        print(f"[{mode}] round {i + 1}/{len(rounds)}: {t_round['seconds']:.2f} s, "
              f"target steps {[sum(v) / len(v) for v in report.target_steps.values()]}", flush=True)
    editor.finalize()
    return round_seconds, steps


def profile_summary(prof, cpu_seconds: float, hp, config) -> dict:
    """The phases of the profiled rounds against two measured bf16 matmul rates: ``2048³`` (the
    CPU's practical peak) and ``[max_batch_tokens, d] @ [d, d_ff]`` (the model's MLP shape at the
    batch size the target optimization runs)."""
    from blueedit.bench.round_profile import markdown, shaped_matmul_rate

    d, d_ff, m = config.hidden_size, config.intermediate_size, hp.max_batch_tokens or 1024
    peak = matmul_peak(torch.bfloat16, "cpu")
    shaped = shaped_matmul_rate(torch.bfloat16, m, d, d_ff)
    rows = prof.rows(cpu_seconds, peak)
    for r in rows:
        r["fraction_of_shaped"] = r["gflop_per_s"] * 1e9 / shaped if r["gflop"] else None
    table = markdown(rows, f"bf16 peak ({peak / 1e9:.0f} GFLOP/s)")
    print(f"\nprofile of the editing rounds ({cpu_seconds:.1f} CPU s; bf16 matmul rates: 2048³ {peak / 1e9:.0f} "
          f"GFLOP/s, [{m} × {d}] @ [{d} × {d_ff}] {shaped / 1e9:.0f} GFLOP/s)\n{table}", flush=True)
    return {"rows": rows, "bf16_peak_gflops_per_s": peak / 1e9, "bf16_shaped_gflops_per_s": shaped / 1e9,
            "table": table, "cpu_seconds": cpu_seconds}


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an ``n × n × n`` matmul in ``dtype`` (the machine's practical peak)."""
    import time

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time  # CPU: per CPU-second (robust to other jobs)
    reps, t0 = 0, clock()
    while True:
        a @ b
        reps += 1
        if cuda:
            torch.cuda.synchronize()
        elapsed = clock() - t0
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed


def target_step_flops(editor, requests, hp) -> dict:
    """FLOPs of one target-optimization step (forward + backward of every prompt of a round,
    timed in CPU seconds on the CPU,
    counted by :class:`torch.utils.flop_counter.FlopCounterMode` over 3 evaluations, the first
    of which runs the whole model and the later two only the replayed blocks), the achieved
    FLOP/s, and that rate as a fraction of the measured float32 and bfloat16 matmul peaks."""
    import dataclasses
    import time

    from torch.utils.flop_counter import FlopCounterMode

    from blueedit.editing.targets import optimize_targets

    layer = hp.edited_layers[0]
    thp = dataclasses.replace(hp.target, v_num_grad_steps=3, early_stop_loss=-1.0)
    args = (editor.compute_model, editor.compute_adapter, editor.tokenizer, requests, layer,
            editor.state.context_templates, thp)
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        optimize_targets(*args, fast=True, max_batch_tokens=hp.max_batch_tokens)
    flops = fc.get_total_flops()
    clock = time.process_time if editor.device.type == "cpu" else time.perf_counter
    with torch.enable_grad():
        t0 = clock()
        optimize_targets(*args, fast=True, max_batch_tokens=hp.max_batch_tokens)
        seconds = clock() - t0
    device = str(editor.device)
    rate = flops / seconds
    peaks = {"float32": matmul_peak(torch.float32, device), "bfloat16": matmul_peak(torch.bfloat16, device)}
    out = {"step_gflops": flops / 3 / 1e9, "step_seconds": seconds / 3, "achieved_gflops_per_s": rate / 1e9,
           "fp32_peak_gflops_per_s": peaks["float32"] / 1e9, "bf16_peak_gflops_per_s": peaks["bfloat16"] / 1e9,
           "fraction_of_fp32_peak": rate / peaks["float32"], "fraction_of_bf16_peak": rate / peaks["bfloat16"]}
    print(f"one target step ({len(requests)} requests, layer {layer}): {out['step_gflops']:.1f} GFLOP in "
          f"{out['step_seconds']:.2f} s = {out['achieved_gflops_per_s']:.1f} GFLOP/s; measured matmul peaks "
          f"fp32 {out['fp32_peak_gflops_per_s']:.1f}, bf16 {out['bf16_peak_gflops_per_s']:.1f} GFLOP/s -> "
          f"{100 * out['fraction_of_fp32_peak']:.0f}% of the fp32 peak, {100 * out['fraction_of_bf16_peak']:.0f}% "
          "of the bf16 peak", flush=True)
    return out


def max_relative_difference(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    """``max_l ‖a_l − b_l‖_F / ‖a_l‖_F`` over the layers both hold."""
    diffs = [float((a[l].double() - b[l].double()).norm() / a[l].double().norm().clamp_min(1e-300))
             for l in a if l in b]
    return max(diffs) if diffs else float("nan")


def markdown_table(results: dict) -> str:
    modes = list(results["modes"])
    ratios = [(a, b) for a, b in RATIOS if a in modes and b in modes]
    head = ["quantity", *modes] + [f"{a} / {b}" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label, fmt in ROWS:
        cells = [label] + [fmt.format(results["modes"][m][key]) for m in modes]
        for a, b in ratios:
            x, y = results["modes"][a][key], results["modes"][b][key]
            cells.append(f"{x / y:.2f}x" if y else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, make_model=None, requests=None, texts=None) -> dict:
    """Run the benchmark and return the results dict.

    ``make_model`` (a function returning a fresh ``(model, tokenizer)``), ``requests`` and
    ``texts`` replace the model, the edit records and the statistics corpus (for tests).
    """
    record = C.RunRecord("speed", argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    config = args.as_dict()
    args.base, args.stats_config = C.benchmark_configs(parser, args)
    modes = C.parse_str_list(args.modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes must be a subset of {MODES}, got {args.modes!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    if requests is None:
        from blueedit.data.formats import load_requests

        requests = load_requests(args.dataset, data_dir=data_dir, num_edits=args.num_edits)
    requests = list(requests)[: args.num_edits]
    if texts is None:
        from blueedit.data.corpus import load_corpus_texts
        from blueedit.editing.setup import MIN_CHARS

        texts = load_corpus_texts(args.stats_config.corpus, data_dir=data_dir,
                                  num_samples=args.stats_config.num_samples, min_chars=MIN_CHARS)
    if make_model is None:
        make_model = C.model_factory(args.model, random_init=args.random_init_config, device=args.device,
                                     dtype=args.dtype, cache_dir=args.cache_dir,
                                     tokenizer_texts=C.request_texts(requests) + list(texts[:50]))
    model_id = C.model_id(args.model, args.random_init_config)

    results: dict = {
        "command": record.command,
        "config": config,
        "versions": C.versions(),
        "device": C.device_description(args.device),
        "model": f"random {args.random_init_config}" if args.random_init_config else args.model,
        "num_edits": len(requests),
        "modes": {},
    }
    mom2s = {}
    results["load_average_1min_before_after"] = [os.getloadavg()[0]]
    for mode in modes:
        print(f"== {mode} ==", flush=True)
        results["modes"][mode], mom2s[mode] = run_mode(mode, args, make_model, requests, texts, model_id)
    results["load_average_1min_before_after"].append(os.getloadavg()[0])
    results["ratios"] = {}
    results["checks"] = {}
    for a, b in RATIOS:
        if a in modes and b in modes:
            x, y = results["modes"][a], results["modes"][b]
            results["ratios"][f"{a}/{b}"] = {k: (x[k] / y[k] if y[k] else None) for k, _, _ in ROWS}
            results["checks"][f"{a}/{b}"] = {
                "c0_max_relative_difference": max_relative_difference(mom2s[b], mom2s[a]),
                "metrics_max_abs_difference": max(abs(x[k] - y[k]) for k in ("efficacy", "generalization", "specificity")),
            }
    results["table"] = markdown_table(results)
    print()
    print(f"{results['model']} on {results['device']}: {args.base.method} ({args.base.strategy}), {len(requests)} "
          f"edits in rounds of {args.edits_per_round}, layers {args.base.layers}, {args.stats_config.num_samples} "
          "statistics texts")
    print(results["table"])
    for pair, ch in results["checks"].items():
        print(f"\n{pair}: C_0 max relative difference {ch['c0_max_relative_difference']:.2e}; "
              f"metrics max |difference|: {ch['metrics_max_abs_difference']:.2f} points")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        results["run"] = record.as_dict()
        out.write_text(json.dumps(results, indent=1, default=str))
        out.with_suffix(".md").write_text(results["table"] + "\n")
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
