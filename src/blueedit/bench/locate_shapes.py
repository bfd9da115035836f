"""``blueedit locate`` on today's architectures with random weights, and their configs.

The weights of Qwen2.5, Qwen3, Llama-3.1/3.2, Mistral-7B-v0.3 and Gemma 3 cannot be downloaded
here, so each is traced on a model of its architecture (its transformers class, depth, norm
placement, GQA ratio, MLP width ratio) built locally with random weights and a reduced width
(``--hidden`` 128: the real widths do not fit this machine's memory and time), tokenized with
SmolLM2's tokenizer (the real tokenizers are not available either). The facts are the first
``--num-facts`` of ``known_1000.json``; a random model knows none of them, so its own top-1 token
is traced (``--all-facts``).

What this can and cannot say: a random network stores no facts, so the curve reflects the
architecture only (how much one MLP output at the last subject token can move the output at each
depth). Configs written from such a trace (``--configs DIR``) therefore carry the ``needs-locate``
mark, and ``blueedit fit`` warns while their layers are used unchanged: run
``blueedit locate --model <hub id>`` on the real weights before relying on them.

For each model: ``benchmarks/results/locate/shapes/<name>/`` (trace.csv, trace.png,
summary.json) and, with ``--configs DIR``, ``DIR/<name>/{memit,alphaedit}.yaml`` with ℛ from the
trace, the loss layer (the last block) and λ from the real MLP width (BLUE is
``--model.editing.strategy boundary`` on either).

    python -m blueedit.bench.locate_shapes --num-facts 20 --samples 2
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from blueedit.bench import harness as C


@dataclass(frozen=True)
class Shape:
    """A released model's architecture: its transformers config class and real sizes."""

    name: str          # configs/<name>/
    hub_id: str
    config_class: str  # transformers class name
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    extra: tuple = ()  # further config keyword arguments, as (key, value) pairs
    v_lr: float = 0.1


SHAPES: tuple[Shape, ...] = (
    Shape("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Qwen2Config", 28, 3584, 18944, 28, 4),
    Shape("qwen3-8b", "Qwen/Qwen3-8B", "Qwen3Config", 36, 4096, 12288, 32, 8),
    Shape("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "LlamaConfig", 32, 4096, 14336, 32, 8),
    Shape("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "LlamaConfig", 28, 3072, 8192, 24, 8),
    Shape("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "MistralConfig", 32, 4096, 14336, 32, 8),
    Shape("gemma3-1b", "google/gemma-3-1b-it", "Gemma3TextConfig", 26, 1152, 6912, 4, 1, v_lr=0.5),
)


def random_model(shape: Shape, hidden: int, vocab: int, seed: int, init_std: float = 0.02):
    """The architecture of ``shape`` at width ``hidden`` (MLP width and GQA ratio kept), random weights."""
    import transformers
    from transformers import AutoModelForCausalLM

    heads = 2
    kv = max(1, heads * shape.kv_heads // shape.heads)
    inter = max(8, round(hidden * shape.intermediate / shape.hidden))
    cfg_cls = getattr(transformers, shape.config_class)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=shape.layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                  head_dim=hidden // heads, tie_word_embeddings=True, initializer_range=init_std)
    kwargs.update(dict(shape.extra))
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), inter


def write_configs(shape: Shape, result, directory: Path, hidden: int) -> None:
    """``directory/<name>/{memit,alphaedit}.yaml`` from a random-weights trace, marked ``needs-locate``."""
    from blueedit.locate import render_config

    header = [
        f"{shape.hub_id}, {{method}}: 2,000 CounterFact edits, 100 per round; loads the model from the Hugging Face hub.",
        f"needs-locate: the layers come from `blueedit locate` on random weights of this architecture "
        f"({shape.config_class}, {shape.layers} blocks, width reduced to {hidden}; blueedit.bench.locate_shapes).",
        f"  Run `blueedit locate --model {shape.hub_id}` on the real weights and pass its layers (--model.editing.layers).",
        f"λ = d_k ({shape.intermediate}) to 2 significant figures; loss layer: the last block.",
    ]
    for method in ("memit", "alphaedit"):
        text = render_config(result, name_or_path=shape.hub_id, method=method, dtype="bfloat16",
                             header=[h.replace("{method}", method) for h in header], paper=True, v_lr=shape.v_lr)
        text = text.replace("# Run: blueedit fit --config <this file>",
                            f"# Run: blueedit fit --config configs/{shape.name}/{method}.yaml")
        text = text.replace(f"runs/{Path(shape.hub_id).name}/", f"runs/{shape.name}/")
        path = directory / shape.name / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from blueedit.locate import format_table, lambda_for_width, load_known_facts, locate, save_result
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, default_cache_dir, local_model_dir

    record = C.RunRecord("locate_shapes", argv)
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="names of SHAPES to run (default: all)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--num-facts", type=int, default=20)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (initializer_range)")
    p.add_argument("--out", default=str(C.RESULTS / "locate" / "shapes"))
    p.add_argument("--configs", default=None, help="also write each model's configs under this directory")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    directory = local_model_dir(ModelConfig("smollm2-135m"), default_cache_dir())
    if directory is None:
        raise SystemExit("needs SmolLM2's converted tokenizer: run any blueedit command on smollm2-135m once")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    facts = load_known_facts(C.default_data_dir() / "rome_eval" / "known_1000.json")
    rows = []
    for shape in SHAPES:
        if args.only and shape.name not in args.only:
            continue
        model, inter = random_model(shape, args.hidden, len(tokenizer), args.seed, args.init_std)
        adapter = ModelAdapter(model)
        result = locate(model, adapter, tokenizer, facts, name=f"{shape.hub_id} (shape)", num_facts=args.num_facts,
                        known_only=False, samples=args.samples, seed=args.seed, random_weights=True)
        # λ and the width in the config are the real model's
        result.mlp_width = shape.intermediate
        result.mom2_update_weight = lambda_for_width(shape.intermediate)
        out = Path(args.out) / shape.name
        save_result(result, out)
        s = result.summary()
        s.update(traced_width={"hidden": args.hidden, "intermediate": inter}, hub_id=shape.hub_id)
        (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
        print(f"== {shape.name}: {shape.layers} layers, traced at width {args.hidden}/{inter}")
        print(format_table(result))
        print(f"ℛ = {result.layers}, loss layer {result.loss_layer}, λ {result.mom2_update_weight:g}; "
              f"{s['seconds']} s wall, {s['cpu_seconds']} s CPU", flush=True)
        if args.configs:
            write_configs(shape, result, Path(args.configs), args.hidden)
        rows.append((shape, result, s))
    md = ["| model | blocks | ℛ (random weights) | loss layer | λ | traced width | seconds (CPU) |",
          "|---|---|---|---|---|---|---|"]
    for shape, result, s in rows:
        md.append(f"| {shape.hub_id} | {shape.layers} | {result.layers[0]}–{result.layers[-1]} | {result.loss_layer} | "
                  f"{result.mom2_update_weight:g} | {args.hidden} / {s['traced_width']['intermediate']} | "
                  f"{s['cpu_seconds']} |")
    if rows and not args.only:
        cmd = record.command
        record.write(Path(args.out))
        (Path(args.out) / "table.md").write_text(
            "# `blueedit locate` on random weights of today's architectures\n\n"
            + "\n".join(md) + f"\n\n{args.num_facts} facts of known_1000.json, {args.samples} noise samples; "
            "random weights store no facts: these windows are placeholders from the shape.\n\n"
            f"Command: `{cmd.strip()}`\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
