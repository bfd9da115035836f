"""A³E on tiny random models: the mask rules, the gate, the sign merge, retrieval, the two
regularizers, removal, save/load/continue (docs/algorithms.md, "A³E")."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.config import UserInputError
from blueedit.data.records import EditRecordError, EditRequest
from blueedit.memory.a3e import (
    A3EConfig,
    A3EEditor,
    adapter_deltas,
    answer_mask,
    cosine_gate,
    merge_deltas,
    preceding_regularizer,
    retrieve,
    state_regularizer,
    unit_answer_scores,
)
from fake_lm import word_level_tokenizer
from helpers import StopAfterRound, fit, make_model

# one token per word, so a single-layer adapter on a tiny random model can be seen to steer an answer
WORDS = ("<pad> <s> </s> Toko Yasuda plays the guitar piano violin The mother tongue of Thomas Stieltjes is "
         "Dutch French English Berlin London Rome Paris Tokyo located in Madrid University Spain").split()
LAYER, KEY_LAYER = 5, 1
EDIT = EditRequest(0, "{} plays the", "Toko Yasuda", "piano", "guitar")
EDIT2 = EditRequest(1, "The mother tongue of {} is", "Thomas Stieltjes", "French", "Dutch")
EDIT3 = EditRequest(2, "{} is located in", "Madrid University", "Tokyo", "Spain")
PROBE = "Toko Yasuda plays the guitar the piano"


def _model(seed: int = 0):
    return make_model("llama", vocab_size=len(WORDS), n_layer=6, seed=seed)


def _editor(model, tok, **kw) -> A3EEditor:
    cfg = dict(key_layer=KEY_LAYER, steps=50, lr=0.5, mask_fraction=0.25)
    cfg.update(kw)
    return A3EEditor(model, tok, A3EConfig(**cfg), layer=LAYER)


def _logits(model, tok, text: str = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


# -- pure functions: oracles written from the equations ---------------------------------------------
def test_answer_mask_picks_the_specified_units():
    scores = torch.tensor([[0.5, -3.0, 2.0, 0.1, -0.2, 4.0],
                           [1.0, 0.0, -5.0, 3.0, 0.3, -0.4]])
    # per row, k = 2: lowest {1, 4} ∪ {2, 5}; highest {5, 2} ∪ {3, 0}; |.| {5, 1} ∪ {2, 3}
    expect = {"lowest": {1, 4, 2, 5}, "highest": {5, 2, 3, 0}, "abs": {5, 1, 2, 3}, "none": set(range(6))}
    for rule, units in expect.items():
        m = answer_mask(scores, 2, rule)
        assert m.dtype == torch.bool and set(torch.nonzero(m).flatten().tolist()) == units, rule


def test_unit_answer_scores_match_a_loop_over_units():
    torch.manual_seed(0)
    d, d_k, V = 5, 7, 11
    w_down, emb = torch.randn(d, d_k), torch.randn(V, d)
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    answer = [3, 9]
    with torch.no_grad():
        got = unit_answer_scores(w_down, norm, emb[answer])
    for i, y in enumerate(answer):
        for j in range(d_k):
            col = w_down[:, j]
            normed = col / math.sqrt(float((col ** 2).mean()) + 1e-6) * norm.weight.detach()
            assert abs(float(got[i, j]) - float(normed @ emb[y])) < 1e-4


def test_gate_is_one_on_its_own_key_and_small_on_others():
    torch.manual_seed(0)
    a = torch.randn(8, 512)
    g = cosine_gate(a, a)  # [8, 8]
    assert torch.allclose(g.diagonal(), torch.ones(8), atol=1e-5)
    off = g[~torch.eye(8, dtype=torch.bool)]
    assert off.abs().max() < 0.25
    assert torch.allclose(cosine_gate(3.0 * a[2], a)[2], torch.tensor(1.0), atol=1e-5)  # scale-free


def test_adapter_with_zero_b_is_zero_and_mask_limits_units():
    gate = torch.tensor([[0.7, -0.2]])
    b = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, True, True]])
    d = adapter_deltas(gate, b, m)
    assert torch.allclose(d, torch.tensor([[[0.7, 0.0, 2.1], [0.0, -1.0, -1.2]]]))
    assert torch.equal(adapter_deltas(gate, torch.zeros_like(b), m), torch.zeros(1, 2, 3))


def test_sign_merge_zeroes_disagreeing_coordinates():
    deltas = torch.tensor([[1.0, 2.0, -1.0, 0.0, 0.5],
                           [-3.0, 1.0, -2.0, 4.0, 0.0],
                           [0.0, 0.5, 0.0, 1.0, -0.5]])
    # coordinate 0: +1, -3 disagree -> 0; 1: all positive -> 3.5; 2: all negative -> -3;
    # 3: 0 ignored, +4 +1 -> 5; 4: +0.5 and -0.5 disagree -> 0
    assert torch.equal(merge_deltas(deltas, "sign"), torch.tensor([0.0, 3.5, -3.0, 5.0, 0.0]))
    assert torch.equal(merge_deltas(deltas, "sum"), deltas.sum(0))


def test_retrieve_returns_the_edits_whose_keys_match():
    torch.manual_seed(1)
    keys = torch.randn(5, 64)
    states = torch.stack([torch.randn(64), keys[3] + 0.01 * torch.randn(64), torch.randn(64), keys[1]])
    assert retrieve(states, keys, tau=0.5, top_m=4) == [1, 3]  # both near 1.0; 1 exact, so first
    assert retrieve(states, keys, tau=0.5, top_m=1) == [1]
    assert retrieve(states[[0, 2]], keys, tau=0.5, top_m=4) == []
    mask = torch.tensor([1, 1, 1, 0])  # the exact copy of key 1 is padding
    assert retrieve(states, keys, tau=0.5, top_m=4, token_mask=mask) == [3]


def test_preceding_regularizer_is_the_mean_positive_logit_of_other_tokens():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5], [1.0, 4.0, -2.0, -1.0]])
    targets = torch.tensor([2, 1])
    # row 0 others: 2.0, 0, 0.5 ; row 1 others: 1.0, 0, 0  -> 3.5 / (2 * 3)
    assert abs(float(preceding_regularizer(logits, targets)) - 3.5 / 6) < 1e-6
    assert abs(float(state_regularizer(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]))) - 1 / math.sqrt(2)) < 1e-6


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="editing.a3e.mask"):
        A3EConfig(mask="middle")
    with pytest.raises(ValueError, match="editing.a3e.merge"):
        A3EConfig(merge="ties")
    with pytest.raises(ValueError, match="editing.a3e.routing"):
        A3EConfig(routing="all")


# -- the editor on a tiny Llama ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(WORDS)


def test_zero_adapters_change_nothing_and_removal_restores_bit_for_bit(tok):
    model = _model()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before, before_prompt = _logits(model, tok), _logits(model, tok, EDIT.filled_prompt)
    ed = _editor(model, tok)
    ed.edit([EDIT])
    with ed.routed([0]):
        edited = _logits(model, tok, EDIT.filled_prompt)
    assert not torch.equal(edited, before_prompt)
    # the same adapter with b = 0 changes nothing
    trained_b = ed.state.b.clone()
    ed.state.b.zero_()
    with ed.routed([0]):
        assert torch.equal(_logits(model, tok), before)
    ed.state.b.copy_(trained_b)
    with ed.disabled():
        assert torch.equal(_logits(model, tok), before)
    assert torch.equal(edited, _logits(model, tok, EDIT.filled_prompt))  # retrieval finds the edit
    ed.remove()
    assert torch.equal(_logits(model, tok), before)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_edits_are_learned_retrieved_and_composed(tok):
    model = _model()
    ed = _editor(model, tok)
    prompts = [r.filled_prompt for r in (EDIT, EDIT2)]
    pre = [ed.generate(p, max_new_tokens=3, stop=None) for p in prompts]
    assert ed.edit([EDIT, EDIT2]) == [0, 1]
    assert [t.mask_units for t in ed.traces] == [16, 16]  # one answer token each, 25 % of d_k = 64
    for i, (p, r) in enumerate(zip(prompts, (EDIT, EDIT2))):
        assert ed.generate(p, max_new_tokens=3, stop=None, edits=[i]).strip().startswith(r.target_new), pre
        assert i in ed.retrieved(p)
        assert ed.generate(p, max_new_tokens=3, stop=None).strip().startswith(r.target_new)  # retrieval
    assert ed.retrieved("Berlin London Rome") == []


def test_bad_records_fail_before_any_training(tok):
    model = _model()
    ed = _editor(model, tok)
    with pytest.raises(EditRecordError, match="case_id=7"):
        ed.edit([EDIT, EditRequest(7, "{} is", "Paris", "", None)])
    assert ed.state.num_edits == 0 and ed.traces == []
    with pytest.raises(ValueError, match="key_layer"):
        A3EEditor(model, tok, A3EConfig(key_layer=5), layer=5)
    with pytest.raises(ValueError, match="up_proj"):
        A3EEditor(model, tok, A3EConfig(key_layer=1, up_proj="mlp.nope"), layer=5)


def test_save_load_and_continue_give_identical_outputs(tok, tmp_path):
    model_a = _model()
    model_b = _model()
    ed_a = _editor(model_a, tok)
    ed_a.edit([EDIT, EDIT2])
    ed_a.save(tmp_path)
    ed_b = A3EEditor.load(model_b, tok, tmp_path)
    for sel in ([0], [1], [0, 1], None):
        with ed_a.routed(sel), ed_b.routed(sel):
            assert torch.equal(_logits(model_a, tok), _logits(model_b, tok))
    ed_a.edit([EDIT3])
    ed_b.edit([EDIT3])
    assert ed_b.state.case_ids == [0, 1, 2]
    for name in ("a", "b", "mask", "keys"):
        assert torch.equal(getattr(ed_a.state, name), getattr(ed_b.state, name)), name
    with ed_a.routed([0, 1, 2]), ed_b.routed([0, 1, 2]):
        assert torch.equal(_logits(model_a, tok), _logits(model_b, tok))


def test_load_refuses_other_weights_and_corrupt_files(tok, tmp_path):
    ed = _editor(_model(), tok)
    ed.edit([EDIT])
    path = ed.save(tmp_path)
    with pytest.raises(ValueError, match="model digest"):
        A3EEditor.load(_model(seed=1), tok, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="digest"):
        A3EEditor.load(_model(), tok, tmp_path)


# -- the config and the CLI -------------------------------------------------------------------------
def test_a3e_with_boundary_is_a_clear_error():
    from blueedit.config import EditingConfig

    with pytest.raises(UserInputError, match="boundary.*does not apply.*'a3e'"):
        EditingConfig(method="a3e", strategy="boundary", layers=[3])
    with pytest.raises(UserInputError, match="'a3e' edits one layer"):
        EditingConfig(method="a3e", layers=[3, 4])
    assert EditingConfig(method="a3e", layers=[5]).a3e.mask == "lowest"


def test_cli_edit_saves_the_base_weights_and_the_adapters(tmp_path, monkeypatch, capsys):
    import json

    from blueedit.cli import main
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer
    from conftest import make_tokenizer

    root = tmp_path / "work"
    base = make_model("llama")
    base.save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    records = [{"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                "target_true": r.target_true, "neighborhood": ["Danielle Darrieux spoke"]} for r in (EDIT, EDIT2)]
    (root / "edits.json").write_text(json.dumps(records))
    args = ["edit", f"--model.model.name_or_path={root / 'tiny-llama'}", "--model.model.dtype=float32",
            "--model.editing.method=a3e", f"--model.editing.layers=[{LAYER}]",
            f"--model.editing.a3e.key_layer={KEY_LAYER}", "--model.editing.a3e.steps=5",
            f"--model.cache_dir={root / 'cache'}", "--model.evaluate=true", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--data.edits_per_round=1", f"--edits={root / 'edits.json'}", f"--output={tmp_path / 'edited'}"]
    monkeypatch.setattr("sys.argv", ["blueedit"])
    with pytest.raises(SystemExit) as exc:  # BLUE with A³E: one line, before the model is loaded
        main(args + ["--model.editing.strategy=boundary"])
    assert exc.value.code == 2 and "boundary" in capsys.readouterr().err and not (tmp_path / "edited").exists()
    main(args)
    out = tmp_path / "edited"
    assert json.loads((out / "edits.json").read_text())["method"] == "a3e"
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(out), dtype="float32"), tmp_path / "c")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())
    ed = A3EEditor.load(model, tok, out)
    assert ed.state.case_ids == [0, 1] and ed.state.rounds_done == 2


def test_config_names_the_bad_number():
    with pytest.raises(ValueError, match=r"editing.a3e.mask_fraction must be in \(0, 1\], got 0.0"):
        A3EConfig(mask_fraction=0.0)
    with pytest.raises(ValueError, match="editing.a3e.steps must be positive.*editing.a3e.beta must be >= 0"):
        A3EConfig(steps=0, beta=-1.0)


def test_fit_checkpoint_resume_is_identical(tmp_path):
    import json

    from blueedit.config import EditingConfig
    from blueedit.data.datamodule import EditDataModule
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    root = tmp_path / "work"
    _model().save_pretrained(root / "tiny")
    word_level_tokenizer(WORDS).save_pretrained(root / "tiny")
    (root / "edits.json").write_text(json.dumps([{"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject,
                                                  "target_new": r.target_new} for r in (EDIT, EDIT2, EDIT3)]))

    def module():
        editing = EditingConfig(method="a3e", layers=[LAYER], a3e=A3EConfig(key_layer=KEY_LAYER, steps=10, lr=0.5))
        return EditingModule(model=ModelConfig(name_or_path=str(root / "tiny"), dtype="float32"), editing=editing,
                             evaluate=False, cache_dir=str(root / "cache"))

    data = lambda: EditDataModule(dataset=str(root / "edits.json"), format="user", edits_per_round=1)  # noqa: E731
    a = module()
    fit(a, data(), default_root_dir=str(tmp_path / "a"))
    assert a.editor.state.case_ids == [0, 1, 2]
    ckpt = tmp_path / "mid.ckpt"
    fit(module(), data(), default_root_dir=str(tmp_path / "b"), callbacks=[StopAfterRound(ckpt, batch_idx=1)])
    b = module()
    fit(b, data(), default_root_dir=str(tmp_path / "b"), ckpt_path=str(ckpt))
    assert b.editor.state.case_ids == [0, 1, 2] and b.editor.state.rounds_done == 3
    for name in ("a", "b", "mask", "keys"):
        assert torch.equal(getattr(a.editor.state, name), getattr(b.editor.state, name)), name
