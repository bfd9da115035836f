"""Time of the in-the-wild evaluation (greedy answers of every prompt of a record), per 1,000 records.

Generates the answers of the first ``--num-edits`` records of ``--dataset`` on the unedited model
(the rewrite prompt, the paraphrases and the neighborhood prompts of each record), times it, and
the teacher-forced evaluation of the same records for comparison, in ``--threads`` threads.
Prints and writes (``--out``, JSON) the seconds per 1,000 records (wall and CPU time), the
number of prompts and generated tokens, and the machine's load average while it ran::

    python -m blueedit.bench.wild_speed --dataset counterfact_eval --num-edits 100 --threads 1
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from blueedit.bench import harness as C


def main(argv: list[str] | None = None) -> dict:
    record = C.RunRecord("wild_speed", argv)
    p = C.plain_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dataset", default="counterfact_eval")
    p.add_argument("--num-edits", type=int, default=100, help="records timed (the first of --dataset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(C.RESULTS / "wild_speed" / "speed.json"))
    args = p.parse_args(argv)
    if args.num_edits < 1:
        p.error("--num-edits must be >= 1")

    from blueedit.data.formats import load_requests
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.evaluation.wild import WildConfig, wild_records
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else C.default_data_dir()
    requests = load_requests(args.dataset, data_dir=data_dir, num_edits=args.num_edits)
    if len(requests) < args.num_edits:
        raise SystemExit(f"--num-edits {args.num_edits}: {args.dataset} has {len(requests)} records")
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.model, dtype=args.dtype))
    load_before = os.getloadavg()
    with C.timed("cpu") as wild_t:
        recs = wild_records(model, tok, requests,
                            WildConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    with C.timed("cpu") as tf_t:
        evaluate_requests(model, tok, requests, batch_size=args.batch_size)
    load_after = os.getloadavg()
    prompts = sum(1 + len(r["answers_paraphrases"]) + len(r["answers_neighborhood"]) for r in recs)
    words = sum(len(a.split()) for r in recs for a in [r["answer_rewrite"], *r["answers_paraphrases"],
                                                           *r["answers_neighborhood"]])
    per = 1000 / args.num_edits
    result = {
        "model": args.model, "dtype": args.dtype,
        "dataset": args.dataset, "records": args.num_edits, "prompts": prompts,
        "mean_answer_words": words / prompts, "threads": args.threads, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "wild_seconds_per_1000_records": wild_t["seconds"] * per,
        "wild_cpu_seconds_per_1000_records": wild_t["cpu_seconds"] * per,
        "teacher_forcing_seconds_per_1000_records": tf_t["seconds"] * per,
        "load_average_1min_before_after": [load_before[0], load_after[0]],
        "cpus": os.cpu_count(), "run": record.as_dict(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
