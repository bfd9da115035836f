"""Peak memory of an editing round, estimated for any Llama-shaped model, and measured.

The target optimization dominates a round's memory: each micro-batch of prompts keeps, for the
backward pass, the activations of every block from the edit layer to the loss layer. This script

1. measures exactly how many bytes one token leaves saved for backward in one decoder block of
   the given shape (a single randomly initialized block, through
   :func:`torch.autograd.graph.saved_tensors_hooks`), in the compute dtype;
2. adds the weights (and the compute copy), ``C_0`` and the float64 solve of the widest edited
   layer, and the log-probabilities at the read positions,

and prints the estimated peak for a round under ``editing.max_batch_tokens``:

    python -m blueedit.bench.memory --shape llama3-8b --max-batch-tokens 2048 --compute-dtype bfloat16
    python -m blueedit.bench.memory --shape smollm2-135m-shape --max-batch-tokens 2048   # compare: blueedit.bench.speed

Without a budget (``--max-batch-tokens 0``) it uses ``--edits-per-round`` × 7 prompts × ``--prompt-tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blueedit.bench import harness as C

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def saved_bytes_per_token(shape: str, dtype: torch.dtype, tokens: int = 64) -> float:
    """Bytes saved for backward per token by one decoder block of ``shape`` (eager attention over
    ``tokens`` positions; the weights do not require grad, only the block's input does)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    kw = dict(C.RANDOM_CONFIGS[shape])
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype)
    block.requires_grad_(False)
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens).unsqueeze(0)
    cos, sin = rope(x, pos)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None].to(dtype)
    # the weights are saved too (for the input gradient) but they are not extra memory
    seen: dict[int, int] = {q.untyped_storage().data_ptr(): 0 for q in block.parameters()}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in seen:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    return sum(seen.values()) / tokens


def estimate(shape: str, *, weight_dtype: str, compute_dtype: str, tokens: int, layers: list[int],
             loss_layer: int | None, read_positions: int) -> dict:
    """Components of the peak (bytes) of one round whose largest micro-batch has ``tokens`` padded
    positions and ``read_positions`` positions where targets are read."""
    kw = C.RANDOM_CONFIGS[shape]
    d, f, n, V = kw["hidden_size"], kw["intermediate_size"], kw["num_hidden_layers"], kw["vocab_size"]
    loss_layer = n - 1 if loss_layer is None else loss_layer
    per_block = 4 * d * d + 3 * d * f  # (attention with GQA is a bit smaller: an upper bound)
    kv = kw.get("num_key_value_heads", kw["num_attention_heads"]) / kw["num_attention_heads"]
    per_block = int(2 * d * d + 2 * kv * d * d + 3 * d * f)
    params = n * per_block + V * d * (1 if kw.get("tie_word_embeddings") else 2)
    weights = params * BYTES[weight_dtype]
    copy = params * BYTES[compute_dtype] if compute_dtype != weight_dtype else 0
    blocks = loss_layer - layers[0] + 1  # the first target layer replays the most blocks
    act_per_token = saved_bytes_per_token(shape, getattr(torch, compute_dtype))
    activations = tokens * blocks * act_per_token
    logits = read_positions * V * 4 * 3  # float32 log-softmax, its input and its gradient
    solve = f * f * (4 + 3 * 8)  # C_0 (float32) + the float64 system, its factor and a right-hand side
    parts = {"weights": weights, "compute_copy": copy, "activations": activations, "log_probs": logits,
             "statistics_and_solve": solve}
    return {"shape": shape, "tokens": tokens, "blocks": blocks, "saved_bytes_per_token_block": act_per_token,
            "parts": parts, "total": sum(parts.values())}


def main(argv: list[str] | None = None) -> dict:
    record = C.RunRecord("memory", argv)
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(C.RANDOM_CONFIGS))
    p.add_argument("--weight-dtype", default=None, choices=sorted(BYTES),
                   help="dtype of the weights (default: bfloat16 for llama3-8b, else float32)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=sorted(BYTES))
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="editing.max_batch_tokens (0: none)")
    p.add_argument("--edits-per-round", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=12, help="mean padded suffix length of a prompt")
    p.add_argument("--layers", default="4,5,6,7,8")
    p.add_argument("--loss-layer", type=int, default=None)
    p.add_argument("--out", default="", help="JSON output")
    args = p.parse_args(argv)
    weight_dtype = args.weight_dtype or ("bfloat16" if args.shape == "llama3-8b" else "float32")
    prompts = args.edits_per_round * 7  # 6 context templates + the KL prompt
    tokens = args.max_batch_tokens or prompts * args.prompt_tokens
    tokens = min(tokens, prompts * args.prompt_tokens)
    read_positions = max(1, tokens // args.prompt_tokens) * 3
    res = estimate(args.shape, weight_dtype=weight_dtype, compute_dtype=args.compute_dtype, tokens=tokens,
                   layers=C.parse_int_list(args.layers), loss_layer=args.loss_layer, read_positions=read_positions)
    gib = 2**30
    print(f"{args.shape}: weights {weight_dtype}, compute {args.compute_dtype}, {args.edits_per_round} edits per round, "
          f"max_batch_tokens {args.max_batch_tokens or 'none'} -> {tokens} positions per micro-batch over "
          f"{res['blocks']} blocks, {res['saved_bytes_per_token_block'] / 1024:.1f} KiB saved per token and block")
    for k, v in res["parts"].items():
        print(f"  {k:22s} {v / gib:8.2f} GiB")
    print(f"  {'estimated peak':22s} {res['total'] / gib:8.2f} GiB")
    res = {**res, "gib": {**{k: v / gib for k, v in res["parts"].items()}, "total": res["total"] / gib},
           "saved_kib_per_token_block": res["saved_bytes_per_token_block"] / 1024,
           "settings": {"weight_dtype": weight_dtype, "compute_dtype": args.compute_dtype,
                        "edits_per_round": args.edits_per_round, "max_batch_tokens": args.max_batch_tokens,
                        "layers": C.parse_int_list(args.layers), "loss_layer": args.loss_layer}}
    if args.out:
        Path(args.out).write_text(json.dumps({**res, "run": record.as_dict()}, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
