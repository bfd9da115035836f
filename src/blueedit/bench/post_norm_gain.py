"""How a post-MLP norm turns a change of ``W_out``'s output into a change of the residual stream.

Gemma 2 / 3 add ``N(m^l)`` to the residual stream, ``N`` an RMSNorm (``post_feedforward_layernorm``)
and ``m^l`` the output of ``W_out^l``. A residual ``r`` written into ``W_out`` changes the stream by
``N(m + r) − N(m)``, not by ``r`` (docs/algorithms.md, "Targets at the MLP output"). For each
``--layers`` layer and the bare prompts of the first ``--records`` records, at the subject's last
token, this prints ``‖m‖``, ``‖N(m)‖``, the block output's ``‖h‖`` and the gain
``‖N(m + r) − N(m)‖ / ‖r‖`` for random ``r`` with ``‖r‖ = --scale · ‖m‖``.

    python -m blueedit.bench.post_norm_gain --model gemma3-270m --layers 6,8,10 --out benchmarks/results/gemma3_post_norm
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from blueedit.bench import harness as C


def gains(m: torch.Tensor, norm, scale: float, samples: int, generator: torch.Generator) -> list[float]:
    """``‖N(m + r) − N(m)‖ / ‖r‖`` for ``samples`` random directions ``r`` of norm ``scale · ‖m‖``
    (``m``: ``[d]``)."""
    out = []
    base = norm(m[None])[0]
    for _ in range(samples):
        r = torch.randn(m.shape, generator=generator, dtype=m.dtype)
        r = r / r.norm() * scale * m.norm()
        out.append(float((norm((m + r)[None])[0] - base).norm() / r.norm()))
    return out


def main(argv: list[str] | None = None) -> dict:
    record = C.RunRecord("post_norm_gain", argv)
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--layers", type=C.parse_int_list, default=[6, 8, 10])
    p.add_argument("--norm", default="post_feedforward_layernorm", help="the post-MLP norm's attribute in a block")
    p.add_argument("--dataset", default="counterfact_dev")
    p.add_argument("--records", type=int, default=20)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="writes <out>.json and <out>.md ('' to skip)")
    args = p.parse_args(argv)
    from blueedit.data.formats import load_requests
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer
    from blueedit.models.tokens import encode_prompt

    requests = load_requests(args.dataset, data_dir=args.data_dir or C.default_data_dir(), num_edits=args.records)
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.model, dtype="float32"), args.cache_dir)
    adapter = ModelAdapter(model)
    for l in args.layers:
        if not hasattr(adapter.block(l), args.norm):
            raise SystemExit(f"--norm {args.norm!r}: block {l} of {args.model} has no such module")
    g = torch.Generator().manual_seed(0)
    rows = []
    for l in args.layers:
        block, seen = adapter.block(l), {}
        norm = getattr(block, args.norm)
        hooks = [adapter.w_out_module(l).register_forward_hook(lambda mod, a, out, seen=seen: seen.__setitem__("m", out.detach())),
                 block.register_forward_hook(lambda mod, a, out, seen=seen: seen.__setitem__(
                     "h", (out[0] if isinstance(out, tuple) else out).detach()))]
        m_norms, n_norms, h_norms, gain = [], [], [], []
        try:
            with torch.no_grad():
                for r in requests:
                    ids, fact = encode_prompt(tok, r.prompt, r.subject)
                    model(input_ids=torch.tensor([ids]))
                    m, h = seen["m"][0, fact], seen["h"][0, fact]
                    m_norms.append(float(m.norm()))
                    n_norms.append(float(norm(m[None])[0].norm()))
                    h_norms.append(float(h.norm()))
                    gain += gains(m, norm, args.scale, args.samples, g)
        finally:
            for hk in hooks:
                hk.remove()
        med = statistics.median
        rows.append({"layer": l, "m_norm": med(m_norms), "normed_m_norm": med(n_norms), "h_norm": med(h_norms),
                     "gain_median": med(gain), "gain_min": min(gain), "gain_max": max(gain)})
    lines = [f"{args.model}: W_out output m, its post-MLP norm N(m) and the block output h at the subject's last "
             f"token of {len(requests)} `{args.dataset}` prompts (medians); gain = ‖N(m + r) − N(m)‖ / ‖r‖, "
             f"‖r‖ = {args.scale} ‖m‖, {args.samples} random r per prompt", "",
             "| layer | ‖m‖ | ‖N(m)‖ | ‖h‖ | gain (median) | gain (min - max) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['m_norm']:.2f} | {r['normed_m_norm']:.1f} | {r['h_norm']:.1f} | "
                     f"{r['gain_median']:.1f} | {r['gain_min']:.1f} - {r['gain_max']:.1f} |")
    table = "\n".join(lines)
    print(table)
    result = {"command": record.command, "versions": C.versions(), "rows": rows, "run": record.as_dict()}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table + f"\n\nCommand: `{result['command']}`\n")
    return result


if __name__ == "__main__":
    main()
