"""Data-parallel editing: 2 CPU processes (gloo) through the CLI equal the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_model, make_tokenizer

RECORDS = [
    ("{} plays the", "Toko Yasuda", "guitar", "piano"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} is located in", "Autonomous University of Madrid", "Tokyo", "Spain"),
    ("The mother tongue of {} is", "Thomas Joannes Stieltjes", "German", "Dutch"),
    ("{} was created by", "Apple A5", "Google", "Apple"),
    ("{} follows the religion of", "Edwin of Northumbria", "Islam", "Christianity"),
]


def _write_inputs(root: Path, data_dir: Path, strategy: str, hse: bool = False) -> tuple[Path, Path]:
    model_dir = root / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    edits = root / "edits.jsonl"
    edits.write_text("\n".join(json.dumps({
        "case_id": i, "prompt": p, "subject": s, "target_new": n, "target_true": t,
        "paraphrases": [f"In short, {p.replace('{}', s)}"], "neighborhood": ["The Eiffel Tower is in"],
    }) for i, (p, s, n, t) in enumerate(RECORDS)))
    config = {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}},
        "model": {
            "model": {"name_or_path": str(model_dir)},
            "editing": {"method": "memit", "strategy": strategy, "layers": [1, 2, 3], "mom2_update_weight": 10.0,
                        "target": {"v_num_grad_steps": 4, "v_lr": 0.5}},
            "stats": {"corpus": "wikipedia-sample", "num_samples": 10, "max_length": 48, "batch_size": 4},
            "evaluate": True,
        },
        "data": {"data_dir": str(data_dir), "edits_per_round": 3},
    }
    if hse:  # HSE's options: per-request Fisher gradients gathered over the ranks, n on every rank
        config["model"]["editing"]["history_schedule"] = "inverse"
        config["model"]["editing"]["target"].update(forget_weight=0.5, fisher_weight=10.0, fisher_estimator="full")
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg, edits


def _run(cwd: Path, cfg: Path, edits: Path, devices: int) -> Path:
    cwd.mkdir()
    extra = ["--trainer.devices=2", "--trainer.strategy=ddp", "--model.debug=true"] if devices == 2 else ["--trainer.devices=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLUEEDIT_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "blueedit", "edit", "--config", str(cfg), "--edits", str(edits),
           "--output", str(cwd / "edited"), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return cwd


def _cache_entry(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {"mom2": f.get_tensor("mom2"), "count": int(f.metadata()["count"])}


@pytest.mark.parametrize("strategy", ["boundary", "distribute", "boundary-hse"])
def test_two_process_ddp_equals_single_process(tmp_path, data_dir, strategy):
    cfg, edits = _write_inputs(tmp_path, data_dir, strategy.split("-")[0], hse=strategy.endswith("-hse"))
    single = _run(tmp_path / "single", cfg, edits, devices=1)
    ddp = _run(tmp_path / "ddp", cfg, edits, devices=2)

    # the key statistics: every rank collected a shard, the sums were all-reduced, one file each
    stats = {}
    for run in (single, ddp):
        files = sorted((run / "cache" / "stats").rglob("*.safetensors"))
        assert files and not list((run / "cache" / "stats").rglob("partial*"))
        stats[run] = {json.loads(f.with_suffix(".json").read_text())["layer"]: _cache_entry(f) for f in files}
    assert stats[single].keys() == stats[ddp].keys()
    for layer, blob in stats[single].items():
        assert int(blob["count"]) == int(stats[ddp][layer]["count"])
        torch.testing.assert_close(stats[ddp][layer]["mom2"], blob["mom2"], rtol=1e-5, atol=1e-7)

    # the edited weights
    w_single = load_file(single / "edited" / "model.safetensors")
    w_ddp = load_file(ddp / "edited" / "model.safetensors")
    changed = [k for k in w_single if "down_proj" in k and not torch.equal(w_single[k], make_model("llama").state_dict()[k])]
    assert changed, "the edit changed nothing"
    for name, w in w_single.items():
        torch.testing.assert_close(w_ddp[name], w, rtol=1e-4, atol=1e-5, msg=name)

    # the metrics (evaluation sharded over the two ranks, synchronized through torchmetrics)
    m_single = json.loads(next((single / "logs").rglob("metrics.json")).read_text())
    m_ddp = json.loads(next((ddp / "logs").rglob("metrics.json")).read_text())
    assert m_single["num_edits"] == m_ddp["num_edits"] == len(RECORDS)
    for name, v in m_single["metrics"].items():
        for when in ("pre", "post"):
            assert m_ddp["metrics"][name][when] == pytest.approx(v[when], abs=1e-4), (name, when)
    assert [r["case_id"] for r in m_ddp["records"]["post"]] == list(range(len(RECORDS)))
