"""A tiny llama GGUF file (float32 tensors, the tests' BPE tokenizer), written in a moment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers import make_tokenizer


def write_tiny_gguf(path: Path, n_layer: int = 2, d: int = 16, ffn: int = 32, heads: int = 2) -> Path:
    """Write a random 2-layer llama model and the tests' tokenizer as the GGUF file ``path``."""
    import gguf

    tok = make_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(d // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), d), "output_norm": (d,), "output": (len(tokens), d)}
    for i in range(n_layer):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ffn, d)), ("ffn_up", (ffn, d)), ("ffn_down", (d, ffn)),
                            ("attn_norm", (d,)), ("ffn_norm", (d,))):
            shapes[f"blk.{i}.{name}"] = shape
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
