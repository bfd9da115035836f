"""Carrying an edited model forward and undoing rounds (``blueedit.carry``, ``editing/updates.py``).

Tolerance (docs/algorithms.md, "Carrying an edited model forward and undoing rounds"): weights
rebuilt from the stored updates, continued in a second sitting, or reverted match the reference
to within :func:`blueedit.carry.tolerance` (4 float32 units in the last place at the largest
entry); on one machine they are bit-identical, which the tests below also check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blueedit import carry
from blueedit.cli import main, run_cli
from blueedit.editing import solvers
from blueedit.editing.updates import LayerUpdate, add_update, replay_history, replay_weights
from helpers import RECORDS, REQUESTS, make_model, make_tokenizer
from helpers import tiny_editor as _editor


# -- the stored updates rebuild the editor's weights and history exactly -----------------------------
@pytest.mark.parametrize("method, strategy", [("memit", "distribute"), ("alphaedit", "boundary"),
                                              ("prune", "boundary"), ("rect", "distribute"),
                                              ("pmet", "distribute"), ("pmet", "boundary")])
def test_stored_updates_rebuild_weights_and_history(method, strategy):
    ed = _editor(method, strategy)
    w0 = {l: ed.adapter.get_w_out(l) for l in ed.hp.edited_layers}
    batches = [REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]]
    for i, batch in enumerate(batches):
        ed.edit_round(batch, i)
    assert len(ed.state.updates) == 3
    for l in ed.hp.edited_layers:
        assert torch.equal(ed.state.original[l], w0[l])
        rebuilt = replay_weights(ed.state.original[l], ed.state.updates, l)
        assert torch.equal(rebuilt, ed.adapter.get_w_out(l)), l
        h = ed.state.history[l]
        assert torch.equal(replay_history(ed.state.updates, l, h.shape[0], h.dtype), h.cpu()), l
        for r, batch in enumerate(batches):
            u = ed.state.updates[r][l]
            assert u.keys.shape == (h.shape[0], len(batch))
            if method == "rect":  # sparsified: kept whole
                assert u.right is None and u.left.shape == w0[l].shape
            else:  # rank ≤ B factors, not the full matrix
                assert u.left.shape == (w0[l].shape[0], len(batch)) and u.right.shape == (len(batch), w0[l].shape[1])


def test_factors_equal_the_closed_form_updates():
    """``ΔW = R Q`` against the textbook formulas with explicit inverses (tests/oracle's style)."""
    g = torch.Generator().manual_seed(0)
    d, dk, B = 6, 9, 3
    R, K = torch.randn(d, B, generator=g, dtype=torch.float64), torch.randn(dk, B, generator=g, dtype=torch.float64)
    X = torch.randn(dk, 4 * dk, generator=g, dtype=torch.float64)
    C0, H = X @ X.T / X.shape[1], 0.3 * torch.eye(dk, dtype=torch.float64)
    left, right = solvers.memit_factors(R, K, C0, H, 2.0)
    expected = R @ K.T @ torch.linalg.inv(2.0 * C0 + H + K @ K.T)
    assert torch.allclose(left @ right, expected, atol=1e-12)
    P = solvers.nullspace_projection(C0 * torch.linspace(0, 1, dk, dtype=torch.float64), 0.3)
    left, right = solvers.alphaedit_factors(R, K, P, H, 10.0)
    expected = (torch.linalg.inv(P @ (H + K @ K.T) + 10.0 * torch.eye(dk, dtype=torch.float64)) @ P @ K @ R.T).T
    assert torch.allclose(left @ right, expected, atol=1e-12)
    assert left.shape == (d, B) and right.shape == (B, dk)


def test_add_update_rounds_like_the_adapter():
    w = torch.randn(4, 5).to(torch.bfloat16)
    delta = torch.randn(4, 5, dtype=torch.float64) * 1e-2
    assert torch.equal(add_update(w, delta), (w.float() + delta.float()).to(torch.bfloat16))
    u = LayerUpdate(torch.randn(4, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64), torch.randn(5, 1))
    assert u.nbytes() == 8 * 4 + 8 * 5 + 4 * 5


# -- the CLI: two sittings equal one run; revert returns to the earlier rounds -------------------------
@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["blueedit"])  # arguments come from main(args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("carry")
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    for name, recs in {"r0-6": RECORDS, "r0-4": RECORDS[:4], "r4-6": RECORDS[4:], "r0-2": RECORDS[:2]}.items():
        (root / f"{name}.json").write_text(json.dumps(recs))
    return root


def _edit(root: Path, model: Path, edits: str, output: Path, method: str, strategy: str, *extra: str) -> None:
    main([
        "edit", f"--model.model.name_or_path={model}",
        f"--model.editing.method={method}", f"--model.editing.strategy={strategy}", "--model.editing.layers=[1,2,3]",
        "--model.editing.target.v_num_grad_steps=3",
        "--model.stats.corpus=model-samples", "--model.stats.num_samples=4", "--model.stats.max_length=32",
        f"--model.stats.cache_dir={root / 'cache'}", "--model.evaluate=false",
        "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={output.parent / ('run-' + output.name)}", "--data.edits_per_round=2",
        f"--edits={root / edits}", f"--output={output}", *extra,
    ])


def _model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _assert_close_dirs(a: Path, b: Path, exact: bool = True) -> None:
    """Every model tensor and the editor state of ``a`` and ``b`` within the stated tolerance
    (and bit-identical when ``exact``)."""
    ta, tb = _model_tensors(a), _model_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        tol = carry.tolerance(ta[k].dtype, float(ta[k].abs().max()))
        assert carry.max_diff(ta[k], tb[k]) <= tol, k
        if exact:
            assert torch.equal(ta[k], tb[k]), k
    sa, ma = carry.read_state(a)
    sb, mb = carry.read_state(b)
    assert sa.rounds_done == sb.rounds_done and sa.finalized == sb.finalized
    assert sa.context_templates == sb.context_templates
    for group in ("history", "projection", "original"):
        ga, gb = getattr(sa, group), getattr(sb, group)
        assert set(ga) == set(gb), group
        for l in ga:
            assert carry.max_diff(ga[l], gb[l]) <= carry.tolerance(torch.float32, float(ga[l].abs().max())), (group, l)
    assert ma["base_fingerprint"] == mb["base_fingerprint"] and ma["stats_keys"] == mb["stats_keys"]
    ea, eb = json.loads((a / "edits.json").read_text()), json.loads((b / "edits.json").read_text())
    assert [r["case_ids"] for r in ea["rounds"]] == [r["case_ids"] for r in eb["rounds"]]
    assert ea["requests"] == eb["requests"] and ea["base_model"] == eb["base_model"]


@pytest.mark.parametrize("method, strategy", [("memit", "distribute"), ("prune", "boundary"), ("pmet", "boundary")])
def test_two_sittings_equal_one_run_and_revert_undoes_rounds(tiny, tmp_path, capsys, method, strategy):
    base = tiny / "tiny-llama"
    one_run, first, second = tmp_path / "one", tmp_path / "first", tmp_path / "second"
    _edit(tiny, base, "r0-6.json", one_run, method, strategy)           # rounds 0, 1, 2 in one run
    out = capsys.readouterr().out
    assert "editor state:" in out and "KiB per round" in out
    _edit(tiny, base, "r0-4.json", first, method, strategy)             # sitting 1: rounds 0, 1
    _edit(tiny, first, "r4-6.json", second, method, strategy)           # sitting 2 on its output: round 2
    _assert_close_dirs(second, one_run)
    assert json.loads((second / "edits.json").read_text())["base_model"] == str(base)
    # `fit` on the first sitting's output continues the same way
    cli = run_cli(["fit", f"--model.model.name_or_path={first}", f"--model.editing.method={method}",
                   f"--model.editing.strategy={strategy}", "--model.editing.layers=[1,2,3]",
                   "--model.editing.target.v_num_grad_steps=3", "--model.stats.corpus=model-samples",
                   "--model.stats.num_samples=4", "--model.stats.max_length=32",
                   f"--model.stats.cache_dir={tiny / 'cache'}", "--model.evaluate=false", "--trainer.accelerator=cpu",
                   "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path / 'fit'}",
                   "--data.edits_per_round=2", f"--data.dataset={tiny / 'r4-6.json'}"])
    assert cli.model.editor.state.rounds_done == 3 and [r.index for r in cli.model.reports] == [2]
    reference = _model_tensors(one_run)
    for l in (1, 2, 3):
        assert torch.equal(cli.model.adapter.get_w_out(l), reference[f"model.layers.{l}.mlp.down_proj.weight"]), l

    # revert 1 of 3 rounds == the two-round model; 2 of 3 == the one-round model
    one_round = tmp_path / "one-round"
    _edit(tiny, base, "r0-2.json", one_round, method, strategy)
    for k, reference in ((1, first), (2, one_round)):
        work = tmp_path / f"revert{k}"
        shutil.copytree(one_run, work)
        capsys.readouterr()
        main(["revert", str(work), "--rounds", str(k)])
        printed = capsys.readouterr().out
        assert f"reverted the last {k} of 3 rounds" in printed and "KiB" in printed
        _assert_close_dirs(work, reference)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".revert{k}")], "temporary directory left"
    # and a reverted model continues like any other: round 2 again gives the three-round model
    again = tmp_path / "again"
    _edit(tiny, tmp_path / "revert1", "r4-6.json", again, method, strategy)
    _assert_close_dirs(again, one_run)


def test_revert_all_rounds_gives_the_base_weights(tiny, tmp_path):
    work = tmp_path / "edited"
    _edit(tiny, tiny / "tiny-llama", "r0-4.json", work, "memit", "boundary")
    main(["revert", str(work), "--rounds", "2"])
    base, reverted = _model_tensors(tiny / "tiny-llama"), _model_tensors(work)
    for k in base:
        assert torch.equal(base[k], reverted[k]), k
    state, _ = carry.read_state(work)
    assert state.rounds_done == 0 and not state.updates
    assert all(not h.any() for h in state.history.values())
    assert json.loads((work / "edits.json").read_text())["rounds"] == []


@pytest.fixture
def edited(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edited") / "edited"
    _edit(tiny, tiny / "tiny-llama", "r0-4.json", out, "memit", "boundary")
    return out


def _fails(args, capsys, match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blueedit: error: ") and match in last, last


def test_mismatched_continuation_fails_before_loading(tiny, edited, tmp_path, capsys, monkeypatch):
    import blueedit.module

    loads = []
    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    for extra, match in (("--model.editing.layers=[2,3,4]", "editing.layers: [1, 2, 3] in"),
                         ("--model.editing.strategy=distribute", "editing.strategy: 'boundary' in"),
                         ("--model.stats.num_samples=5", "stats.num_samples: 4 in")):
        args_out = tmp_path / "out"
        with pytest.raises(SystemExit) as exc:
            _edit(tiny, edited, "r4-6.json", args_out, "memit", "boundary", extra)
        assert exc.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "was edited with other settings" in last and match in last, last
    assert not loads


def test_changed_weights_or_base_are_refused(tiny, edited, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # an edited matrix changed after editing: neither continued nor reverted
    bad = tmp_path / "bad"
    shutil.copytree(edited, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"] += 1e-3
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _fails(["revert", str(bad), "--rounds", "1"], capsys, "W_out of layer 1 differs from what its editor state rebuilds")
    with pytest.raises(SystemExit):
        _edit(tiny, bad, "r4-6.json", tmp_path / "out", "memit", "boundary")
    assert "W_out of layer 1 differs" in capsys.readouterr().err
    # another weight changed: the base is not the one it was edited from
    other = tmp_path / "other"
    shutil.copytree(edited, other)
    sd = load_file(str(other / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"] += 1e-3
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit):
        _edit(tiny, other, "r4-6.json", tmp_path / "out2", "memit", "boundary")
    assert "not the base model" in capsys.readouterr().err
    _fails(["revert", str(edited), "--rounds", "3"], capsys, "holds 2 rounds; revert 1..2")
    _fails(["revert", str(tiny / "tiny-llama"), "--rounds", "1"], capsys, "holds no editor state")


def test_revert_is_atomic(edited, tmp_path, monkeypatch):
    """A revert that fails while writing leaves DIR as it was and no temporary directory."""
    import safetensors.torch

    before = {p.name: p.read_bytes() for p in edited.iterdir()}

    def dies(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(OSError, match="No space left"):
        carry.revert(edited, 1)
    assert {p.name: p.read_bytes() for p in edited.iterdir()} == before
    assert not [p for p in edited.parent.iterdir() if p.name.startswith(".")]


# -- see the edit: greedy generations before and after, side by side -----------------------------------
def test_generate_shows_before_and_after_side_by_side(tiny, edited, tmp_path, capsys):
    from blueedit.data.records import EditRequest
    from blueedit.evaluation.fluency import generate_greedy
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    out = tmp_path / "gen"
    capsys.readouterr()
    main(["generate", str(edited), "--max_new_tokens", "5", f"--output_dir={out}", "--device=cpu"])
    printed = capsys.readouterr().out
    assert "| case_id | kind | prompt | expected | before | after |" in printed
    rows = json.loads((out / "generations.json").read_text())["rows"]
    requests = [EditRequest.from_dict(r) for r in RECORDS[:4]]
    # the rewrite prompt, its paraphrase and its neighborhood prompt, for each of the 4 edited records
    assert [(r["case_id"], r["kind"]) for r in rows] == [
        (q.case_id, k) for q in requests for k in ("rewrite", "paraphrase", "neighborhood")]
    assert rows[0]["prompt"] == "Toko Yasuda plays the" and rows[0]["expected"] == "violin"
    assert rows[2]["expected"] == "guitar"  # the neighborhood keeps the true answer
    prompts = [r["prompt"] for r in rows]
    # oracle: the base and the edited model each loaded on their own and decoded greedily
    for name, path in (("before", tiny / "tiny-llama"), ("after", edited)):
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(path)))
        expected = generate_greedy(model, tok, prompts, max_new_tokens=5, include_prompt=False)
        assert [r[name] for r in rows] == expected, name
    assert any(r["before"] != r["after"] for r in rows), "the edit changed no continuation"
    md = (out / "generations.md").read_text()
    assert md.count("\n| ") == len(rows) + 1
    # --base loads the model before editing instead of rebuilding it: the same table
    main(["generate", str(edited), "--max_new_tokens", "5", f"--output_dir={tmp_path / 'gen2'}",
          f"--base={tiny / 'tiny-llama'}", "--device=cpu"])
    assert json.loads((tmp_path / "gen2" / "generations.json").read_text())["rows"] == rows
    _fails(["generate", str(tiny / "tiny-llama")], capsys, "holds no editor state")


def test_state_without_every_rounds_updates_is_not_saved(tmp_path):
    """A run resumed from a checkpoint of an older blueedit lacks the earlier rounds' updates: its
    state is refused (the model is still saved, with a warning), never saved as if complete."""
    from types import SimpleNamespace

    ed = _editor("memit", "boundary")
    ed.edit_round(REQUESTS[:1], 0)
    ed.state.updates = []
    with pytest.raises(carry.CarryError, match="updates of 0 of its 1 rounds"):
        carry.save_state(tmp_path, SimpleNamespace(editor=ed, adapter=ed.adapter))


def test_settings_added_later_compare_with_their_defaults():
    """A directory saved before a setting existed was edited with its default value."""
    carry.check_settings("D", {"editing": {"method": "memit"}}, {"editing": {"method": "memit", "use_history": True}})
    with pytest.raises(carry.CarryError, match="editing.use_history: True in D, False now"):
        carry.check_settings("D", {"editing": {"method": "memit"}},
                             {"editing": {"method": "memit", "use_history": False}})
    carry.check_settings("D", {"editing": {"target": {"v_lr": 0.5}}}, {"editing": {"target": {"v_lr": 0.1}}})


def test_side_by_side_feeds_wrapped_prompts_and_shows_the_plain_ones():
    from blueedit.data.records import EditRequest
    from blueedit.evaluation.side_by_side import markdown, side_by_side

    req = EditRequest.from_dict({**RECORDS[0], "neighborhood_targets": ["drums"]})
    seen = {}

    def model(name):
        def fn(prompts):
            seen[name] = list(prompts)
            return [f"{name}:{p}" for p in prompts]
        return fn

    rows = side_by_side([req], model("before"), model("after"), wrap=lambda p: f"<user>{p}</user>")
    assert seen["before"] == seen["after"] == ["<user>Toko Yasuda plays the</user>",
                                               "<user>Toko Yasuda is known for playing the</user>",
                                               "<user>Danielle Darrieux plays the</user>"]
    assert [r["prompt"] for r in rows] == ["Toko Yasuda plays the", "Toko Yasuda is known for playing the",
                                           "Danielle Darrieux plays the"]
    assert [r["expected"] for r in rows] == ["violin", "violin", "drums"]
    assert rows[0]["before"] == "before:<user>Toko Yasuda plays the</user>"
    table = markdown(rows, width=20).splitlines()
    assert len(table) == 5 and all(line.count(" | ") == 5 for line in table[2:])


def test_revert_sharded_gpt2(tiny, tmp_path, monkeypatch):
    """GPT-2 stores W_out transposed (Conv1D) and big models are saved in shards: revert finds each
    edited matrix in its shard and writes it back in the stored orientation."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, d, *a, **k: real(self, d, *a, **{**k, "max_shard_size": "40KB"}))
    gpt2 = tmp_path / "tiny-gpt2"
    make_model("gpt2").save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    two, one = tmp_path / "two", tmp_path / "one"
    _edit(tiny, gpt2, "r0-4.json", two, "memit", "distribute")
    _edit(tiny, gpt2, "r0-2.json", one, "memit", "distribute")
    index = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    _, meta = carry.read_state(two)
    assert meta["weights"]["1"]["transposed"] and meta["weights"]["1"]["name"] == "transformer.h.1.mlp.c_proj.weight"
    main(["revert", str(two), "--rounds", "1"])

    def tensors(d):
        from safetensors.torch import load_file

        out = {}
        for f in sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())):
            out.update(load_file(str(d / f)))
        return out

    a, b = tensors(two), tensors(one)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_continue_in_place(tiny, tmp_path):
    """`edit` on DIR with --output DIR --overwrite continues it in place (swapped in atomically)."""
    one_run, work = tmp_path / "one", tmp_path / "work"
    _edit(tiny, tiny / "tiny-llama", "r0-6.json", one_run, "memit", "boundary")
    _edit(tiny, tiny / "tiny-llama", "r0-4.json", work, "memit", "boundary")
    _edit(tiny, work, "r4-6.json", work, "memit", "boundary", "--overwrite=true")
    _assert_close_dirs(work, one_run)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hse_fisher_state_is_carried_and_not_reverted(tiny, tmp_path, capsys):
    """HSE's accumulated Fisher information travels with the saved state, so two sittings equal
    one run; revert refuses it by name (the Fisher sum is not stored per round)."""
    base, fisher = tiny / "tiny-llama", "--model.editing.target.fisher_weight=0.5"
    one_run, first, second = tmp_path / "one", tmp_path / "first", tmp_path / "second"
    _edit(tiny, base, "r0-6.json", one_run, "memit", "distribute", fisher)
    _edit(tiny, base, "r0-4.json", first, "memit", "distribute", fisher)
    _edit(tiny, first, "r4-6.json", second, "memit", "distribute", fisher)
    _assert_close_dirs(second, one_run)
    s_one, _ = carry.read_state(one_run)
    s_two, _ = carry.read_state(second)
    assert s_one.fisher and set(s_one.fisher) == set(s_two.fisher)
    for l in s_one.fisher:
        assert torch.equal(s_one.fisher[l], s_two.fisher[l]), l
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["revert", str(second), "--rounds", "1"])
    assert "Fisher" in capsys.readouterr().err


EVERY_CALLBACK = json.dumps([
    {"class_path": "blueedit.callbacks.weight_shift.WeightShiftError", "init_args": {"every_n_rounds": 1}},
    {"class_path": "blueedit.callbacks.drift.HiddenStateDrift", "init_args": {"num_probes": 2}},
    {"class_path": "blueedit.callbacks.progress.EditProgress"},
    {"class_path": "blueedit.callbacks.sequence.SequenceEvaluation", "init_args": {"every_n_edits": 2}},
])


@pytest.mark.parametrize("method, strategy", [("memit", "distribute"), ("pmet", "distribute"), ("memit", "boundary")])
def test_saved_with_every_callback_replays_to_the_written_weights(tiny, tmp_path, method, strategy):
    """The diagnostic callbacks (the weight shift error solves an ideal update on every layer of a
    diagnosed round) leave the saved edit history holding the updates that were written: replaying
    them from the base weights gives the saved model's weights exactly."""
    out = tmp_path / "edited"
    _edit(tiny, tiny / "tiny-llama", "r0-4.json", out, method, strategy, f"--trainer.callbacks={EVERY_CALLBACK}")
    state, _ = carry.read_state(out)
    saved = _model_tensors(out)
    assert state.rounds_done == 2 and sorted(state.original) == ([1, 2, 3] if strategy == "distribute" else [1, 3])
    for l in state.original:
        replayed = replay_weights(state.original[l], state.updates, l)
        assert torch.equal(replayed, saved[f"model.layers.{l}.mlp.down_proj.weight"]), l


# -- a damaged editor state is refused, naming the file and the tensor ----------------------------------
def _flip_bytes(path: Path, tensor: str, n: int = 8) -> None:
    """Invert ``n`` bytes in the middle of ``tensor``'s data inside the safetensors file ``path``."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + size])[tensor]["data_offsets"]
    at = 8 + size + (begin + end) // 2 - n // 2
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    path.write_bytes(bytes(raw))


def _damaged(name: str) -> str:
    return f"{carry.STATE_FILE} is damaged: tensor {name!r} fails its SHA-256 checksum; nothing was used or written"


def test_every_kind_of_state_tensor_is_verified(tmp_path):
    from blueedit.editing.editor import EditorState
    from blueedit.models.loading import ChecksumError

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = EditorState(history={1: r(6, 6)}, projection={1: r(6, 6)}, original={1: r(4, 6)}, fisher={1: r(4, 6)},
                        rounds_done=2, context_templates=["{}"],
                        updates=[{1: LayerUpdate(r(4, 2).double(), r(2, 6).double(), r(6, 2))},
                                 {1: LayerUpdate(r(4, 6).double(), None, r(6, 3))}])
    intact = tmp_path / "intact"
    intact.mkdir()
    carry.write_state(intact / carry.STATE_FILE, state, {"base_model": "b"})
    assert not [p for p in intact.iterdir() if p.name != carry.STATE_FILE], "temporary file left"
    names = ["history.1", "projection.1", "original.1", "fisher.1", "round.0.1.left", "round.0.1.right",
             "round.0.1.keys", "round.1.1.left", "round.1.1.keys"]
    assert sorted(carry.read_header(intact)["sha256"]) == sorted(names)
    back, _ = carry.read_state(intact)
    assert torch.equal(back.history[1], state.history[1]) and back.updates[1][1].right is None
    for name in names:
        bad = tmp_path / name
        shutil.copytree(intact, bad)
        _flip_bytes(bad / carry.STATE_FILE, name)
        with pytest.raises(ChecksumError) as exc:
            carry.read_state(bad)
        assert str(exc.value) == f"{bad / carry.STATE_FILE} is damaged: tensor {name!r} fails its SHA-256 checksum; " \
                                 "nothing was used or written"
    # the metadata too: another base model's name, or another round count, written over the original
    for entry, old_text, new_text in (("meta", b'\\"base_model\\": \\"b\\"', b'\\"base_model\\": \\"c\\"'),
                                      ("rounds_done", b'"rounds_done":"2"', b'"rounds_done":"1"')):
        bad = tmp_path / f"metadata-{entry}"
        shutil.copytree(intact, bad)
        raw = (bad / carry.STATE_FILE).read_bytes()
        assert raw.count(old_text) == 1, entry
        (bad / carry.STATE_FILE).write_bytes(raw.replace(old_text, new_text))
        with pytest.raises(ChecksumError, match=f"is damaged: metadata entry {entry!r} fails its SHA-256 checksum"):
            carry.read_header(bad)


def test_a_damaged_state_is_neither_continued_reverted_nor_shown(tiny, edited, tmp_path, capsys, monkeypatch):
    import blueedit.models.loading

    load = blueedit.models.loading.load_model_and_tokenizer
    loaded = []
    monkeypatch.setattr(blueedit.models.loading, "load_model_and_tokenizer",
                        lambda *a, **k: loaded.append(a) or load(*a, **k))
    for name, command in (("history.1", "continue"), ("original.3", "continue"), ("round.1.3.left", "continue"),
                          ("round.0.1.keys", "revert"), ("original.1", "generate")):
        bad = tmp_path / f"{command}-{name}"
        shutil.copytree(edited, bad)
        _flip_bytes(bad / carry.STATE_FILE, name)
        before = {p.name: p.read_bytes() for p in bad.iterdir()}
        out = tmp_path / f"out-{command}-{name}"
        with pytest.raises(SystemExit) as exc:
            if command == "continue":
                _edit(tiny, bad, "r4-6.json", out, "memit", "boundary")
            elif command == "revert":
                main(["revert", str(bad), "--rounds", "1"])
            else:
                main(["generate", str(bad), f"--output_dir={out}", "--device=cpu"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert _damaged(name) in err and str(bad) in err, err
        assert "weights were changed" not in err  # the state file is blamed, not the model
        assert {p.name: p.read_bytes() for p in bad.iterdir()} == before and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not loaded  # generate refuses before loading the model (continue loads it in the module)


def test_reverted_and_continued_states_carry_fresh_checksums(tiny, edited, tmp_path):
    from safetensors.torch import load_file

    from blueedit.models.loading import entry_digests

    work, more = tmp_path / "work", tmp_path / "more"
    shutil.copytree(edited, work)
    main(["revert", str(work), "--rounds", "1"])
    _edit(tiny, work, "r4-6.json", more, "memit", "boundary")
    for d in (work, more):
        assert carry.read_header(d)["sha256"] == entry_digests(load_file(str(d / carry.STATE_FILE)))


def test_a_twice_continued_model_names_the_original_base(tiny, tmp_path):
    base, first, second, third = tiny / "tiny-llama", tmp_path / "first", tmp_path / "second", tmp_path / "third"
    _edit(tiny, base, "r0-2.json", first, "memit", "boundary")
    _edit(tiny, first, "r4-6.json", second, "memit", "boundary")
    _edit(tiny, second, "r0-2.json", third, "memit", "boundary")
    fingerprint = carry.read_header(first)["meta"]["base_fingerprint"]
    for d in (first, second, third):
        meta = carry.read_header(d)["meta"]
        assert meta["base_model"] == str(base), d
        assert meta["base_fingerprint"] == fingerprint, d
        assert json.loads((d / "edits.json").read_text())["base_model"] == str(base), d
    assert carry.read_header(third)["rounds_done"] == 3


def test_a_failed_write_leaves_a_checkpoint_that_finishes_the_edit(tiny, tmp_path, monkeypatch):
    """When writing the edited model fails, `edit` says where the edits survive (a checkpoint
    written with the public Trainer.save_checkpoint); resuming from it writes the same model."""
    base, reference, out = tiny / "tiny-llama", tmp_path / "reference", tmp_path / "out"
    _edit(tiny, base, "r0-4.json", reference, "memit", "distribute")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("blueedit.cli.save_edited_model", full_disk)
        with pytest.raises(OSError, match="No space left on device") as failure:
            _edit(tiny, base, "r0-4.json", out, "memit", "distribute")
    message = str(failure.value)
    assert f"writing the edited model to {out} failed" in message and "resume with --ckpt_path" in message
    checkpoint = Path(message.rsplit("--ckpt_path ", 1)[1])
    assert checkpoint.is_file() and not out.exists()
    _edit(tiny, base, "r0-4.json", out, "memit", "distribute", f"--ckpt_path={checkpoint}")
    _assert_close_dirs(out, reference)
