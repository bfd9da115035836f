"""WISE on tiny random models: routing, the margin loss, TIES merging, checkpoint/resume, saving
and deleting the side memory (docs/algorithms.md, "WISE")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.editor import EditingConfig
from blueedit.editing.wise import (
    WiseConfig,
    WiseEditor,
    WiseState,
    activation_distance,
    merge_weights,
    random_mask,
    routing_margin_loss,
    ties_merge,
)
from blueedit.models.adapters import ModelAdapter
from helpers import make_model, make_tokenizer

LAYER = 3
EDIT = EditRequest(0, "{} plays the", "Toko Yasuda", "violin", "guitar", ("Toko Yasuda is known for playing the",),
                   ("Danielle Darrieux plays the",))
EDIT2 = EditRequest(1, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch")
EDIT3 = EditRequest(2, "{} is located in", "Autonomous University of Madrid", "Tokyo", "Spain")
UNRELATED = "Berlin London Rome Madrid Tokyo Beijing"
IRRELEVANT = ["The Eiffel Tower is in Paris", "Google makes Android"]
TEMPLATES = ["{}", "Therefore, because I said so. {}"]


def _config(**kw) -> EditingConfig:
    # margins on the scale of this tiny random model (Δact ~ 0.1)
    wise = dict(alpha=0.05, beta=0.5, gamma=0.3, n_iter=40, lr=100.0, mask_ratio=0.5, shard_size=2, merge_every=2)
    wise.update(kw)
    return EditingConfig(method="wise", layers=[LAYER], wise=WiseConfig(**wise))


def _editor(model, tok, **kw) -> WiseEditor:
    return WiseEditor(model, tok, ModelAdapter(model), _config(**kw), TEMPLATES, IRRELEVANT)


def _routes(editor: WiseEditor, tok, texts: list[str]) -> list[int]:
    """Index of the side memory each text is routed to (-1: the original), one text per call."""
    out = []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            editor.model(**enc)
        out.append(int(editor.wrapper.last_routes[0]))
    return out


# -- pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d_e, d_i", [(25.0, 1.0), (3.0, 1.0), (25.0, 7.0), (12.0, 6.0), (0.0, 0.0), (30.0, 22.0)])
def test_margin_loss_has_the_published_form(d_e, d_i):
    a, b, g = 5.0, 20.0, 10.0
    expected = max(0.0, d_i - a) + max(0.0, b - d_e) + max(0.0, g - (d_e - d_i))  # paper eq. (5)
    got = routing_margin_loss(torch.tensor([d_e]), torch.tensor([d_i]), a, b, g)
    assert float(got) == pytest.approx(expected)


def test_margin_loss_averages_each_term_over_its_inputs():
    d_e, d_i = torch.tensor([25.0, 15.0, 8.0]), torch.tensor([2.0, 9.0])
    a, b, g = 5.0, 20.0, 10.0
    irr = sum(max(0.0, x - a) for x in d_i.tolist()) / 2
    edit = sum(max(0.0, b - x) for x in d_e.tolist()) / 3
    gap = sum(max(0.0, g - (e - i)) for e in d_e.tolist() for i in d_i.tolist()) / 6
    assert float(routing_margin_loss(d_e, d_i, a, b, g)) == pytest.approx(irr + edit + gap)


def test_activation_distance_is_the_mean_token_norm_of_the_output_difference():
    torch.manual_seed(0)
    keys, w0 = torch.randn(2, 4, 6), torch.randn(3, 6)
    w1 = w0 + torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = activation_distance(keys, w1, w0, mask)
    for b in range(2):
        n = int(mask[b].sum())
        norms = [float(torch.linalg.vector_norm(keys[b, t] @ w1.T - keys[b, t] @ w0.T)) for t in range(n)]
        assert float(got[b]) == pytest.approx(sum(norms) / n, rel=1e-5)
    # the published distance: the activation applied to both outputs first
    act = torch.nn.functional.silu
    got = activation_distance(keys, w1, w0, None, act)
    ref = (act(keys @ w1.T) - act(keys @ w0.T)).norm(dim=-1).mean(-1)
    assert torch.allclose(got, ref)


def test_ties_merge_of_two_shards_equals_a_hand_computation():
    base = torch.ones(2, 3)
    t1 = base + torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
    t2 = base + torch.tensor([[2.0, 1.0, 0.0], [-1.0, 0.5, -3.0]])
    # density 1: signs elected from the sum, disjoint mean of the agreeing entries
    expected = base + torch.tensor([[1.5, -2.0, 0.0], [3.0, 0.5, -2.0]])
    assert torch.allclose(ties_merge(base, [t1, t2], [0.5, 0.5], 1.0), expected)
    # density 0.5: each task vector keeps its 3 largest entries first
    t1 = base + torch.tensor([[1.0, -2.0, 0.1], [3.0, 0.5, -1.5]])  # keeps 3, -2, -1.5
    t2 = base + torch.tensor([[2.0, 1.2, 0.0], [-1.0, 0.25, -3.0]])  # keeps -3, 2, 1.2
    expected = base + torch.tensor([[2.0, -2.0, 0.0], [3.0, 0.0, -2.25]])
    assert torch.allclose(ties_merge(base, [t1, t2], [0.5, 0.5], 0.5), expected)
    # unequal weights move the elected sign: 0.2·(−2) + 0.8·1.2 > 0 at (0, 1)
    got = ties_merge(base, [t1, t2], [0.2, 0.8], 0.5)
    assert float(got[0, 1]) == pytest.approx(1.0 + 1.2)


def test_repeated_merge_weights():
    assert merge_weights(2, False, "equal") == [0.5, 0.5]
    assert merge_weights(2, True, "equal") == pytest.approx([1 / 3] * 3)
    assert merge_weights(2, True, "published") == pytest.approx([0.2, 0.2, 0.6])


def test_random_mask_ratio_and_reproducibility():
    m = random_mask((200, 300), 0.2, seed=3)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.2) < 0.01
    assert torch.equal(m, random_mask((200, 300), 0.2, seed=3))
    overlap = (m & random_mask((200, 300), 0.2, seed=4)).float().mean().item()
    assert abs(overlap - 0.04) < 0.01  # Theorem 2.1: two shards overlap on ρ² of the entries


def test_config_errors():
    with pytest.raises(ValueError, match="boundary.*does not apply.*wise"):
        EditingConfig(method="wise", strategy="boundary", layers=[3])
    with pytest.raises(ValueError, match="edits one layer"):
        EditingConfig(method="wise", layers=[3, 4])
    with pytest.raises(ValueError, match="merge_every"):
        WiseConfig(shard_size=3, merge_every=4)
    with pytest.raises(ValueError, match="variant"):
        WiseConfig(variant="both")


# -- the editor on a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_routing_sends_the_edit_to_the_side_memory_and_unrelated_text_to_the_original(tok):
    model = make_model("llama")
    editor = _editor(model, tok)
    assert _routes(editor, tok, [EDIT.filled_prompt]) == [-1]  # nothing edited: all original
    editor.edit_round([EDIT], 0)
    assert editor.state.edits_done == 1 and editor.state.current_threshold < float("inf")
    routes = _routes(editor, tok, [EDIT.filled_prompt + " violin", EDIT.filled_prompt, UNRELATED])
    assert routes == [0, 0, -1]
    # the edit is learned through the side memory
    enc = tok(EDIT.filled_prompt, return_tensors="pt")
    target = tok(" violin", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        assert int(model(**enc).logits[0, -1].argmax()) == target


def test_padding_does_not_change_the_route(tok):
    model = make_model("llama")
    editor = _editor(model, tok)
    editor.edit_round([EDIT], 0)
    tok_l = make_tokenizer(padding_side="left")
    enc = tok_l([EDIT.filled_prompt, UNRELATED + " and Paris and Rome and Oslo"], return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    assert editor.wrapper.last_routes.tolist() == [0, -1]
    padded = editor.wrapper.last_distances[0]
    for i, text in enumerate([EDIT.filled_prompt, UNRELATED + " and Paris and Rome and Oslo"]):
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
        assert float(editor.wrapper.last_distances[0, 0]) == pytest.approx(float(padded[i]), rel=1e-4), text


def test_deleting_the_side_memory_restores_the_original_bit_for_bit(tok):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = tok(EDIT.filled_prompt, return_tensors="pt")
    with torch.no_grad():
        logits_before = model(**enc).logits
    editor = _editor(model, tok)
    editor.edit_round([EDIT], 0)
    editor.edit_round([EDIT2], 1)  # a full shard, merged
    assert editor.state.merges_done == 1
    editor.remove()
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, logits_before)


def test_shards_merge_with_ties_and_retrieve_keeps_one_memory_per_merge(tok):
    model = make_model("llama")
    editor = _editor(model, tok, shard_size=1, merge_every=2)
    editor.edit_round([EDIT], 0)
    assert len(editor.state.shards) == 1 and editor.state.current is None
    first = editor.state.shards[0].clone()
    editor.edit_round([EDIT2], 1)
    st = editor.state
    assert st.merges_done == 1 and not st.shards and len(st.memories) == 1
    assert st.memory_thresholds[0] == pytest.approx(min(st.memory_thresholds))
    # each shard trained only its own mask: outside it the shard is the original
    m0 = random_mask(tuple(st.original.shape), 0.5, seed=0)
    assert torch.equal(first[~m0], st.original[~m0])

    model = make_model("llama")
    editor = _editor(model, tok, shard_size=1, merge_every=1, variant="retrieve")
    editor.edit_round([EDIT], 0)
    editor.edit_round([EDIT2], 1)
    assert len(editor.state.memories) == 2 and len(editor.wrapper.candidates) == 2
    assert _routes(editor, tok, [EDIT.filled_prompt, EDIT2.filled_prompt, UNRELATED]) == [0, 1, -1]


def test_a_failed_edit_leaves_the_state_unchanged(tok):
    from blueedit.editing.editor import EditRoundError

    model = make_model("llama")
    editor = _editor(model, tok, shard_size=4, merge_every=4)
    editor.edit_round([EDIT], 0)
    before = editor.state.to_dict()
    editor.cfg.lr = float("nan")
    with pytest.raises(EditRoundError, match="round 1"):
        editor.edit_round([EDIT2], 1)
    after = editor.state.to_dict()
    assert torch.equal(after["current"], before["current"]) and after["edits_done"] == 1


def test_saved_model_reloads_with_routing_intact(tok, tmp_path):
    from blueedit.editing.wise import SIDE_MEMORY_FILE, SideMemoryLayer, save_wise_model
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    model = make_model("llama")
    model_dir = tmp_path / "base"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    editor = _editor(model, tok)
    editor.edit_round([EDIT], 0)
    out = tmp_path / "edited"
    save_wise_model(editor, out)
    tok.save_pretrained(out)
    assert (out / SIDE_MEMORY_FILE).is_file()
    loaded, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(out), dtype="float32"), tmp_path / "cache")
    assert isinstance(ModelAdapter(loaded).w_out_module(LAYER), SideMemoryLayer)
    for text in (EDIT.filled_prompt, UNRELATED):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(loaded(**enc).logits, model(**enc).logits), text
    # a damaged side memory is refused, naming the file and the tensor, and nothing is attached
    intact = (out / SIDE_MEMORY_FILE).read_bytes()
    for name in ("current", "current_mask", "original", "counters", "config"):
        saved = torch.load(out / SIDE_MEMORY_FILE, weights_only=True)
        if name == "counters":
            saved["state"]["current_threshold"] *= 1.5
        elif name == "config":
            saved["config"]["mask_ratio"] /= 2
        else:
            t = saved["state"][name].reshape(-1)
            t[t.numel() // 2] = ~t[t.numel() // 2] if t.dtype == torch.bool else t[t.numel() // 2] + 1e-3
        torch.save(saved, out / SIDE_MEMORY_FILE)
        with pytest.raises(ValueError, match=f"{SIDE_MEMORY_FILE} is damaged: entry '{name}' fails its SHA-256 "
                                             "checksum; nothing was used or written"):
            load_model_and_tokenizer(ModelConfig(name_or_path=str(out), dtype="float32"), tmp_path / "cache")
        (out / SIDE_MEMORY_FILE).write_bytes(intact)
    # the directory without its side memory file is the pre-edit model
    (out / SIDE_MEMORY_FILE).unlink()
    plain, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(out), dtype="float32"), tmp_path / "cache")
    ref = make_model("llama")
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_state_round_trips_through_weights_only_torch_load(tok, tmp_path):
    model = make_model("llama")
    editor = _editor(model, tok, shard_size=1, merge_every=2)
    editor.edit_round([EDIT], 0)
    torch.save(editor.state.to_dict(), tmp_path / "s.pt")
    d = torch.load(tmp_path / "s.pt", weights_only=True)
    st = WiseState.from_dict(d)
    assert st.edits_done == 1 and len(st.shards) == 1 and torch.equal(st.shards[0], editor.state.shards[0])
    other = make_model("llama", seed=1)
    fresh = _editor(other, tok)
    with pytest.raises(ValueError, match="another model"):
        fresh.load_state(st)


# -- Lightning: fit, checkpoint, resume -------------------------------------------------------------
RECORDS = [
    {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
     "target_true": r.target_true, "neighborhood": ["Danielle Darrieux spoke"]}
    for r in (EDIT, EDIT2, EDIT3)
]
IRRELEVANT_RECORDS = [
    {"case_id": i, "prompt": "{} is", "subject": "x", "target_new": "y", "target_true": "z",
     "neighborhood": [p.rsplit(" ", 1)[0]], "neighborhood_targets": [p.rsplit(" ", 1)[1]]}
    for i, p in enumerate(IRRELEVANT)
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wise")
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    (root / "edits.json").write_text(json.dumps(RECORDS))
    (root / "irrelevant.json").write_text(json.dumps(IRRELEVANT_RECORDS))
    return root


def _module(root: Path, evaluate: bool = False):
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    editing = _config(irrelevant_dataset=str(root / "irrelevant.json"), context_lengths=[3], n_iter=15,
                      shard_size=2, merge_every=2)
    return EditingModule(model=ModelConfig(name_or_path=str(root / "tiny-llama"), dtype="float32"), editing=editing,
                         evaluate=evaluate, eval_batch_size=8, cache_dir=str(root / "cache"))


def _data(root: Path):
    from blueedit.data.datamodule import EditDataModule

    return EditDataModule(dataset=str(root / "edits.json"), format="user", edits_per_round=1)


def test_fit_checkpoint_resume_is_identical(workdir, tmp_path):
    from helpers import StopAfterRound as _StopAfterRound
    from helpers import fit as _fit

    a = _module(workdir, evaluate=True)
    ta = _fit(a, _data(workdir), default_root_dir=str(tmp_path))
    assert ta.global_step == 3 and a.editor.state.edits_done == 3 and a.editor.state.merges_done == 1
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["method"] == "wise" and summary["metrics"]["locality"]["post"] is not None

    ckpt = tmp_path / "mid.ckpt"
    b1 = _module(workdir)
    _fit(b1, _data(workdir), callbacks=[_StopAfterRound(ckpt, batch_idx=1)])
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["blueedit"]["editor"]["method"] == "wise" and saved["blueedit"]["editor"]["edits_done"] == 2
    b2 = _module(workdir)
    tb2 = _fit(b2, _data(workdir), ckpt_path=str(ckpt))
    assert tb2.global_step == 3
    sa, sb = a.editor.state.to_dict(), b2.editor.state.to_dict()
    for key in ("current", "current_mask", "original"):
        assert torch.equal(sa[key], sb[key]), key
    assert len(sa["memories"]) == len(sb["memories"]) == 1
    assert torch.equal(sa["memories"][0], sb["memories"][0])
    assert sa["memory_thresholds"] == sb["memory_thresholds"] and sa["current_threshold"] == sb["current_threshold"]
    assert sa["context_templates"] == sb["context_templates"]
    enc = b2.tokenizer([EDIT3.filled_prompt, EDIT.filled_prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(a.lm(**enc).logits, b2.lm(**enc).logits)


# -- the CLI: `blueedit edit --output` and the boundary error -----------------------------------------
def _cli_args(root: Path, run: Path, *extra: str) -> list[str]:
    return ["edit", f"--model.model.name_or_path={root / 'tiny-llama'}", "--model.model.dtype=float32",
            "--model.editing.method=wise", f"--model.editing.layers=[{LAYER}]",
            f"--model.editing.wise.irrelevant_dataset={root / 'irrelevant.json'}",
            "--model.editing.wise.n_iter=5", "--model.editing.wise.context_lengths=[3]",
            "--model.editing.wise.shard_size=2", "--model.editing.wise.merge_every=2",
            f"--model.cache_dir={root / 'cache'}", "--model.evaluate=false", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
            "--data.edits_per_round=1", f"--edits={root / 'edits.json'}", f"--output={run / 'edited'}", *extra]


def test_cli_edit_saves_a_model_that_reloads_with_its_side_memory(workdir, tmp_path, monkeypatch, capsys):
    from blueedit.cli import main
    from blueedit.editing.wise import SIDE_MEMORY_FILE, SideMemoryLayer
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    monkeypatch.setattr("sys.argv", ["blueedit"])
    with pytest.raises(SystemExit) as exc:  # BLUE with WISE: one line, before the model is loaded
        main(_cli_args(workdir, tmp_path, "--model.editing.strategy=boundary"))
    assert exc.value.code == 2
    assert "boundary" in capsys.readouterr().err and not (tmp_path / "edited").exists()
    main(_cli_args(workdir, tmp_path))
    out = tmp_path / "edited"
    saved = torch.load(out / SIDE_MEMORY_FILE, weights_only=True)
    assert saved["state"]["edits_done"] == 3 and saved["state"]["merges_done"] == 1
    assert json.loads((out / "edits.json").read_text())["method"] == "wise"
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(out), dtype="float32"), tmp_path / "c")
    wrapper = ModelAdapter(model).w_out_module(LAYER)
    assert isinstance(wrapper, SideMemoryLayer) and len(wrapper.candidates) == 1
    base = make_model("llama")  # the directory's weights are the original ones
    for k, v in base.state_dict().items():
        key = k.replace("mlp.down_proj.", "mlp.down_proj.original.") if f"layers.{LAYER}.mlp.down_proj" in k else k
        assert torch.equal(model.state_dict()[key], v), k


# -- locality: agreement with the pre-edit model (every method) ----------------------------------------
def test_locality_pools_answer_positions_and_matches_records_by_case_id():
    from blueedit.evaluation.editing_metrics import EvaluationResult, add_locality, locality_agreement

    assert locality_agreement([[1, 2, 3], [4]], [[1, 9, 3], [5]]) == pytest.approx(2 / 4)  # pooled, not 1/3+0
    assert locality_agreement([], []) is None
    pre = {"records": [{"case_id": "a", "neighborhood_predictions": [[1, 2], [3]]},
                       {"case_id": "b", "neighborhood_predictions": [[7]]}]}
    post = EvaluationResult({}, [{"case_id": "b", "neighborhood_predictions": [[7]]},
                                 {"case_id": "a", "neighborhood_predictions": [[1, 0], [3]]}], "zsre", 2)
    add_locality(post, pre)
    assert post.records[0]["locality"] == 1.0 and post.records[1]["locality"] == pytest.approx(2 / 3)
    assert post.metrics["locality"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)


@pytest.mark.parametrize("kind", ["zsre", "counterfact"])
def test_locality_is_100_unedited_and_drops_when_the_model_changes(tok, kind):
    from blueedit.evaluation.editing_metrics import add_locality, evaluate_requests

    source = "zsre" if kind == "zsre" else "counterfact"
    reqs = [EditRequest(i, r.prompt, r.subject, r.target_new, "Paris", (), ("Berlin London Rome", "Google makes"),
                        ("Madrid Tokyo", "Android"), source=source) for i, r in enumerate([EDIT, EDIT2])]
    model = make_model("llama")
    pre = evaluate_requests(model, tok, reqs, kind=kind)
    same = evaluate_requests(model, tok, reqs, kind=kind)
    add_locality(same, pre)
    assert same.metrics["locality"] == 100.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    changed = evaluate_requests(model, tok, reqs, kind=kind)
    add_locality(changed, pre.to_dict())
    assert changed.metrics["locality"] < 100.0
