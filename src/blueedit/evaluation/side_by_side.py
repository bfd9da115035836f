"""See the edit: greedy generations before and after editing, side by side (``blueedit generate``).

For every edited record the model continues its rewrite prompt, its paraphrases and its
neighborhood prompts greedily (:func:`~blueedit.evaluation.fluency.generate_greedy`), once with the
weights before editing and once with the edited weights. An edit that took shows ``o*`` after
the rewrite prompt and paraphrases, and the neighborhood's continuations unchanged.

``blueedit generate DIR`` reads the records from ``DIR/edits.json`` and the weights before editing
from DIR's editor state (``W_0`` of the edited layers, :mod:`blueedit.carry`), so it loads one
model; ``--base MODEL`` loads the model before editing instead (for directories without a state).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from blueedit.config import UserInputError
from blueedit.data.records import EditRequest
from blueedit.evaluation.fluency import generate_greedy

#: The prompt kinds of a record, in the order they are shown.
KINDS: tuple[str, ...] = ("rewrite", "paraphrase", "neighborhood")


def record_prompts(req: EditRequest) -> list[tuple[str, str]]:
    """``(kind, prompt)`` for the rewrite prompt, the paraphrases and the neighborhood of ``req``."""
    return ([("rewrite", req.filled_prompt)] + [("paraphrase", p) for p in req.paraphrases]
            + [("neighborhood", p) for p in req.neighborhood])


def side_by_side(
    requests: list[EditRequest],
    before: Callable[[list[str]], list[str]],
    after: Callable[[list[str]], list[str]],
    wrap: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """One row per prompt of every record: ``case_id``, ``kind``, ``prompt``, the expected answer
    (``target_new`` for rewrite and paraphrases, the neighborhood's answer otherwise), and the
    continuations ``before`` and ``after`` (each a function of the list of all prompts). ``wrap``
    turns a prompt into the text the model is given (the chat template); rows show the prompt."""
    rows: list[dict[str, Any]] = []
    for req in requests:
        answers = iter(req.neighborhood_answers())
        for kind, prompt in record_prompts(req):
            expected = req.target_new if kind != "neighborhood" else next(answers, "")
            rows.append({"case_id": req.case_id, "kind": kind, "prompt": prompt, "expected": expected,
                         "target_true": req.target_true})
    prompts = [wrap(r["prompt"]) if wrap else r["prompt"] for r in rows]
    for name, fn in (("before", before), ("after", after)):
        texts = fn(prompts) if prompts else []
        for row, text in zip(rows, texts):
            row[name] = text
    return rows


def _cell(text: Any, width: int | None = None) -> str:
    s = " ".join(str(text if text is not None else "").split()).replace("|", "\\|")
    if width is not None and len(s) > width:
        s = s[: width - 1] + "…"
    return s


def markdown(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """A Markdown table: record, kind, prompt, expected answer, before, after (cells cut at ``width``)."""
    lines = ["| case_id | kind | prompt | expected | before | after |", "|---|---|---|---|---|---|"]
    for r in rows:
        changed = "" if r.get("before") != r.get("after") else " (unchanged)"
        lines.append(f"| {_cell(r['case_id'])} | {r['kind']} | {_cell(r['prompt'], width)} | {_cell(r['expected'])} | "
                     f"{_cell(r.get('before'), width)} | {_cell(r.get('after'), width)}{changed} |")
    return "\n".join(lines)


def _greedy(model, tokenizer, max_new_tokens: int, batch_size: int) -> Callable[[list[str]], list[str]]:
    return lambda prompts: generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size, include_prompt=False)


def _weights_before(state, model) -> Callable[[], AbstractContextManager]:
    """The weights before editing, ``W_0`` of DIR's (verified) editor ``state``, put into ``model``
    while the returned context is open."""
    from blueedit import carry
    from blueedit.models.adapters import ModelAdapter

    adapter = ModelAdapter(model)
    return lambda: carry.base_weights(adapter, state.original)


def _load_records(path: str | None, directory: Path) -> list[EditRequest]:
    if path is not None:
        from blueedit.data.formats import load_requests

        return load_requests(path)
    edits = directory / "edits.json"
    if not edits.is_file():
        raise FileNotFoundError(f"{directory} has no edits.json: pass the records with --records FILE")
    return [EditRequest.from_dict(d) for d in json.loads(edits.read_text()).get("requests", [])]


def generate_main(argv: list[str]) -> None:
    """``blueedit generate DIR [--records FILE] [--base MODEL] [--max_new_tokens N] [--output_dir D]``."""
    import torch

    from blueedit import carry
    from blueedit.cli import evaluated_model_dir_name
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    parser = argparse.ArgumentParser(
        prog="blueedit generate", exit_on_error=False,
        description="Greedy generations before and after editing, side by side, for each edited record's "
                    "prompt, paraphrases and neighborhood prompts. Prints a Markdown table and writes "
                    "generations.md and generations.json.")
    parser.add_argument("directory", help="the edited model directory (`blueedit edit --output DIR`)")
    parser.add_argument("--records", default=None, help="edit records to show (default: DIR/edits.json)")
    parser.add_argument("--base", default=None, help="the model before editing (default: rebuilt from DIR's "
                                                      "editor state, without loading a second model)")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="tokens per continuation (default 20)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_records", type=int, default=None, help="show the first N records only")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output_dir", default=None, help="default: generate/<DIR name>")
    parser.add_argument("--width", type=int, default=60, help="characters per printed cell (the files keep all)")
    parser.add_argument("--chat_template", choices=("auto", "true", "false"), default="auto",
                        help="wrap prompts in the tokenizer's chat template (auto: as DIR was edited)")
    args = parser.parse_args(argv)
    directory = Path(args.directory).expanduser()
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserInputError("--max_new_tokens and --batch_size must be >= 1")
    if not directory.exists():
        raise FileNotFoundError(f"blueedit generate: {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"blueedit generate: {directory} is a file, not an edited model directory")
    if args.base is None and not carry.has_state(directory):
        raise carry.CarryError(f"{directory} holds no editor state ({carry.STATE_FILE}): pass the model before "
                               "editing with --base MODEL")
    # the editor state is verified before the model is loaded
    state = carry.read_state(directory)[0] if args.base is None else None
    requests = _load_records(args.records, directory)
    if args.num_records is not None:
        requests = requests[: args.num_records]
    if not requests:
        raise UserInputError(f"no records to show (from {args.records or directory / 'edits.json'})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(directory), dtype=args.dtype))
    model.to(device)
    after = _greedy(model, tokenizer, args.max_new_tokens, args.batch_size)
    if args.base is None:
        weights_before = _weights_before(state, model)

        def before(prompts: list[str]) -> list[str]:
            with weights_before():
                return after(prompts)
    else:
        base, base_tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.base, dtype=args.dtype))
        base.to(device)
        before = _greedy(base, base_tok, args.max_new_tokens, args.batch_size)
    chat = args.chat_template == "true"
    if args.chat_template == "auto" and carry.has_state(directory):
        chat = bool(carry.read_header(directory)["meta"]["settings"].get("model", {}).get("chat_template"))
    wrap = None
    if chat:
        from blueedit.models.chat import chat_wrap

        wrap = lambda prompt: chat_wrap(tokenizer, prompt)  # noqa: E731
    rows = side_by_side(requests, before, after, wrap)
    out_dir = Path(args.output_dir or Path("generate") / evaluated_model_dir_name(str(directory)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generations.json").write_text(json.dumps(
        {"model": str(directory), "base": args.base or "W_0 from the editor state",
         "max_new_tokens": args.max_new_tokens, "chat_template": chat, "rows": rows}, indent=1, default=str))
    title = (f"# Greedy generations before and after editing\n\nModel: `{directory}`; before: "
             f"{'`' + args.base + '`' if args.base else 'the weights before editing (editor state)'}; "
             f"{args.max_new_tokens} new tokens per prompt.\n\n")
    (out_dir / "generations.md").write_text(title + markdown(rows) + "\n")
    print(markdown(rows, width=args.width))
    print(f"generations written to {out_dir / 'generations.md'} and generations.json")

