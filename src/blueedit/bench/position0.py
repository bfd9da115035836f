"""Edits whose fact token is position 0: count them, and compare their edit metrics with the rest.

A model without a BOS token (SmolLM2) puts the first token of a prompt at position 0, the
attention sink: its hidden states do not depend on any context and carry the sink's outsized
features. When the subject starts the prompt and its last token is its first token, the fact
token (the last subject token, located by :func:`blueedit.models.tokens.encode_prompt`, as the
engine locates it) is position 0 in the bare prompt that the target optimizer reads ``h_init``
and the current value from.

``count``: for each record file, the records whose fact token is position 0 in the edit prompt.
``compare``: edit the position-0 records of a file plus as many others (the first ones), with
MEMIT and MEMIT + BLUE, and report efficacy and generalization of each group, with
``editing.target.anchor_position0`` off (as published) and on.

Run::

    python -m blueedit.bench.position0 count --out benchmarks/results/position0/count.json
    python -m blueedit.bench.position0 compare --limit 8 --edits-per-round 25 \
        --out benchmarks/results/position0/compare.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blueedit.bench.harness import REPO, RunRecord, default_data_dir, plain_parser

#: The record files counted, relative to the data directory.
FILES = ("counterfact/counterfact_eval.json", "counterfact/counterfact_dev.json",
         "counterfact/easyedit/counterfact-edit.json.gz", "counterfact/easyedit/counterfact-train.json.gz",
         "counterfact/easyedit/counterfact-val.json.gz")


def fact_positions(tokenizer, requests) -> list[int]:
    """The fact-token position of each request's edit prompt (``encode_prompt``, the engine's)."""
    from blueedit.models.tokens import encode_prompt

    return [encode_prompt(tokenizer, r.prompt, r.subject)[1] for r in requests]


def count(tokenizer, data_dir: Path) -> dict:
    """Per file: records, those whose fact token is position 0, and the first few of them."""
    from blueedit.data.formats import load_requests

    out = {}
    for rel in FILES:
        path = data_dir / rel
        if not path.is_file():
            continue
        requests = load_requests(str(path))
        pos = fact_positions(tokenizer, requests)
        zero = [r for r, p in zip(requests, pos) if p == 0]
        out[rel] = {"records": len(requests), "position0": len(zero),
                    "fraction": round(len(zero) / max(1, len(requests)), 4),
                    "position0_case_ids": [r.case_id for r in zero],
                    "examples": [r.filled_prompt for r in zero[:5]]}
    return out


def memit_config(strategy: str, compute_dtype: str | None, **target):
    """MEMIT's :class:`~blueedit.config.EditingConfig` from ``configs/smollm2-135m/memit.yaml``."""
    import yaml

    from blueedit.config import EditingConfig, StatsConfig, TargetConfig

    cfg = yaml.safe_load((REPO / "configs/smollm2-135m/memit.yaml").read_text())["model"]
    ed = dict(cfg["editing"], strategy=strategy, compute_dtype=compute_dtype)
    ed["target"] = TargetConfig(**ed["target"], **target)
    return EditingConfig(**ed), StatsConfig(**cfg["stats"])


def group_metrics(result, zero_ids: set) -> dict:
    """Efficacy and generalization (percent) of the position-0 records and of the others."""
    out = {}
    for name, keep in (("position0", lambda c: c in zero_ids), ("others", lambda c: c not in zero_ids)):
        recs = [r for r in result.records if keep(r["case_id"])]
        gen = [sum(r["generalization"]) / len(r["generalization"]) for r in recs if r["generalization"]]
        eff = [float(r["efficacy"]) for r in recs if r["efficacy"] is not None]
        out[name] = {"records": len(recs), "efficacy": round(100 * sum(eff) / max(1, len(eff)), 2),
                     "generalization": round(100 * sum(gen) / max(1, len(gen)), 2),
                     "failed_efficacy": [r["case_id"] for r in recs if r["efficacy"] is False]}
    return out


def compare(args) -> dict:
    """Edit the position-0 records of ``args.dataset`` plus as many others, interleaved, with
    MEMIT (``distribute``) and MEMIT + BLUE (``boundary``); metrics per group after the last round."""
    from blueedit.data.formats import load_requests
    from blueedit.editing.setup import build_editor, cached_key_statistics
    from blueedit.editing.targets import generate_context_templates
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import (
        ModelConfig,
        load_model_and_tokenizer,
        model_fingerprint,
    )

    spec = ModelConfig(name_or_path=args.model, dtype="float32")
    model, tok = load_model_and_tokenizer(spec)
    requests = load_requests(str(Path(args.data_dir or default_data_dir()) / args.dataset))
    pos = fact_positions(tok, requests)
    zero = [r for r, p in zip(requests, pos) if p == 0][: args.limit]
    rest = [r for r, p in zip(requests, pos) if p != 0][: len(zero)]
    chosen = [r for pair in zip(zero, rest) for r in pair]
    zero_ids = {r.case_id for r in zero}
    adapter = ModelAdapter(model)
    hp0, stats = memit_config("distribute", args.compute_dtype)
    mom2 = cached_key_statistics(model, tok, hp0.layers, stats, model_id=model_fingerprint(spec), adapter=adapter,
                                 data_dir=args.data_dir or default_data_dir(), progress=False)
    original = {l: adapter.get_w_out(l).clone() for l in hp0.layers}
    templates = generate_context_templates(model, tok)
    out = {"command": "python -m blueedit.bench.position0 " + " ".join(sys.argv[1:]), "dataset": args.dataset,
           "records": len(chosen), "edits_per_round": args.edits_per_round,
           "compute_dtype": args.compute_dtype, "pre_edit": group_metrics(evaluate_requests(model, tok, chosen), zero_ids),
           "runs": []}
    for strategy in args.strategies.split(","):
        for option in args.options:
            hp, _ = memit_config(strategy, args.compute_dtype, **option)
            for l, w in original.items():
                adapter.set_w_out(l, w)
            editor = build_editor(model, tok, hp, adapter=adapter, mom2=mom2, context_templates=templates)
            for i in range(0, len(chosen), args.edits_per_round):
                editor.edit_round(chosen[i : i + args.edits_per_round], i // args.edits_per_round)
            editor.finalize()
            run = {"strategy": strategy, **option, **group_metrics(evaluate_requests(model, tok, chosen), zero_ids)}
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
            write_json(args.out, out)  # after every run: an interrupted comparison keeps the runs done
    for l, w in original.items():
        adapter.set_w_out(l, w)
    return out


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def write_run_record(record: RunRecord, out: str) -> None:
    """``run.json`` beside ``out``, naming this command and those of the other results there."""
    directory = Path(out).parent
    old = directory / RunRecord.FILENAME
    commands = json.loads(old.read_text()).get("commands", []) if old.is_file() else []
    commands = [c for c in commands if c.split()[:4] != record.command.split()[:4]] + [record.command]
    record.write(directory, commands=commands)


def main(argv: list[str] | None = None) -> dict:
    p = plain_parser(__doc__)
    p.add_argument("command", choices=("count", "compare"))
    p.add_argument("--dataset", default="counterfact/easyedit/counterfact-edit.json.gz",
                   help="compare: the record file (inside the data directory)")
    p.add_argument("--limit", type=int, default=26, help="compare: position-0 records edited (as many others)")
    p.add_argument("--edits-per-round", type=int, default=25)
    p.add_argument("--strategies", default="boundary,distribute")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--anchor", default="off,on", help="compare: editing.target.anchor_position0 values run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    record = RunRecord("position0", argv)
    args.options = [{"anchor_position0": a == "on"} for a in args.anchor.split(",")]
    if args.command == "compare":
        result = compare(args)
        write_run_record(record, args.out)
        return result
    from transformers import AutoTokenizer

    from blueedit.models.loading import default_cache_dir, resolve_packaged

    directory, gguf = resolve_packaged(args.model, default_cache_dir()) or (args.model, None)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    result = {"model": args.model, "adds_bos": tok("x")["input_ids"][0] == tok.bos_token_id,
              "files": count(tok, data_dir)}
    write_json(args.out, result)
    write_run_record(record, args.out)
    for rel, c in result["files"].items():
        print(f"{rel}: {c['position0']} / {c['records']} ({100 * c['fraction']:.1f} %)")
    return result


if __name__ == "__main__":
    main()
