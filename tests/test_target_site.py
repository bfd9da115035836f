"""``editing.target.site: mlp``: targets and residuals at the output of ``W_out`` (docs/algorithms.md,
"Targets at the MLP output").

- It is refused where it is not defined (residual distribution, PMET, WISE), naming the option.
- On a model that adds the MLP output to the residual stream as it is (Llama), a δ at the MLP
  output and one at the block output change the forward pass identically, so with the terms that
  scale with the site's own norm switched off (weight decay, clamp) the two sites write the same
  update: an oracle that needs no second implementation.
- On a model with a post-MLP norm (Gemma 3) the residuals are the MLP-output values the target
  asks for: the weight shift diagnostic, which reads its ideal target in the same space, measures
  zero under BLUE, and the two sites write different updates.
"""

from __future__ import annotations

import pytest
import torch

from blueedit.callbacks.weight_shift import layer_diagnostics
from blueedit.data.records import EditRequest
from blueedit.editing.editor import EditingConfig, Editor
from blueedit.editing.targets import TargetConfig
from blueedit.models.adapters import ModelAdapter
from helpers import key_moments as _mom2
from helpers import make_model, make_tokenizer

TEMPLATES = ["{}", "Because I said so. {}"]
REQUESTS = [
    EditRequest(10, "{} plays the", "Toko Yasuda", "violin", "guitar"),
    EditRequest(11, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch"),
]


def _gemma3(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=64,
                              max_position_embeddings=128, sliding_window=16, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)
    return tf.Gemma3ForCausalLM(cfg).eval()


def _editor(model, site: str, layers=(1, 2, 3), **target) -> Editor:
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    mom2 = _mom2(model, adapter, tok, list(layers))
    hp = EditingConfig(method="memit", strategy="boundary", layers=list(layers),
                       target=TargetConfig(v_num_grad_steps=4, v_lr=0.5, site=site, **target))
    return Editor(model, tok, adapter, hp, mom2, TEMPLATES)


@pytest.mark.parametrize("kw, message", [
    ({"strategy": "distribute"}, "needs editing.strategy 'boundary'"),
    ({"method": "pmet", "strategy": "boundary"}, "does not apply to editing.method 'pmet'"),
    ({"method": "wise", "layers": [2]}, "does not apply to editing.method 'wise'"),
])
def test_mlp_site_is_refused_where_it_is_not_defined(kw, message):
    with pytest.raises(ValueError, match=message):
        EditingConfig(**{"layers": [1, 2, 3], **kw, "target": TargetConfig(site="mlp")})


def test_unknown_site_is_refused():
    with pytest.raises(ValueError, match="editing.target.site"):
        TargetConfig(site="attn")


def test_without_a_post_mlp_norm_both_sites_write_the_same_update():
    no_scale = {"v_weight_decay": 0.0, "clamp_norm_factor": 1e6}
    deltas = {}
    for site in ("block", "mlp"):
        ed = _editor(make_model("llama"), site, **no_scale)
        before = {l: ed.adapter.get_w_out(l).clone() for l in ed.hp.edited_layers}
        report = ed.edit_round(REQUESTS)
        deltas[site] = {l: ed.adapter.get_w_out(l) - w for l, w in before.items()}
        assert all(report.update_norms[l] > 0 for l in ed.hp.edited_layers)
    for l in deltas["block"]:
        ref = deltas["block"][l]
        assert torch.allclose(deltas["mlp"][l], ref, atol=1e-4 * float(ref.abs().max())), l


def test_with_a_post_mlp_norm_the_residual_is_the_mlp_output_change():
    deltas = {}
    for site in ("block", "mlp"):
        ed = _editor(_gemma3(), site)
        assert ed.residuals_at_mlp == (site == "mlp")
        before = {l: ed.adapter.get_w_out(l).clone() for l in ed.hp.edited_layers}
        diagnostics = {}

        def diagnose(step, ed=ed, diagnostics=diagnostics):
            diagnostics[step.layer] = layer_diagnostics(ed, step, contribution=True)

        ed.on_layer = diagnose
        ed.edit_round(REQUESTS)
        deltas[site] = {l: ed.adapter.get_w_out(l) - w for l, w in before.items()}
        for l, d in diagnostics.items():  # BLUE: the applied target is the ideal one, in either space
            assert d["frobenius"] == pytest.approx(0.0, abs=1e-6), (site, l)
            assert d["contribution_computed"] == pytest.approx(d["contribution_distributed"], rel=1e-6)
    for l in deltas["block"]:
        assert not torch.allclose(deltas["mlp"][l], deltas["block"][l], atol=1e-6), l


def test_post_norm_gain_measures_what_the_norm_does(tmp_path):
    """``blueedit.bench.post_norm_gain``: the gain is 1 without a norm, ``c`` for a norm that scales by
    ``c``, and runs end to end on a tiny Gemma 3 (whose post-MLP RMSNorm amplifies a small ``m``)."""
    import json

    from helpers import RECORDS, benchmark

    bench = benchmark("post_norm_gain")
    g = torch.Generator().manual_seed(0)
    m = torch.randn(32, generator=g)
    assert bench.gains(m, torch.nn.Identity(), 0.1, 3, g) == pytest.approx([1.0] * 3)
    assert bench.gains(m, lambda x: 3.0 * x, 0.1, 3, g) == pytest.approx([3.0] * 3)

    _gemma3().save_pretrained(tmp_path / "tiny-gemma3")
    make_tokenizer().save_pretrained(tmp_path / "tiny-gemma3")
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS))
    res = bench.main(["--model", str(tmp_path / "tiny-gemma3"), "--layers", "1,2", "--dataset",
                      str(tmp_path / "edits.json"), "--records", "2", "--out", str(tmp_path / "gain")])
    assert [r["layer"] for r in res["rows"]] == [1, 2]
    assert all(r["gain_median"] > 0 and r["normed_m_norm"] > 0 for r in res["rows"])
    assert (tmp_path / "gain.md").read_text().count("\n| ") == 3  # header + two layers
    with pytest.raises(SystemExit, match="no such module"):
        bench.main(["--model", str(tmp_path / "tiny-gemma3"), "--layers", "1", "--norm", "nope",
                    "--dataset", str(tmp_path / "edits.json"), "--records", "1"])


def test_checkpoints_from_before_the_option_still_resume(monkeypatch):
    """The settings fingerprint leaves ``site`` out at its default (checkpoints written before the
    option existed resume) and records it when set (a run with the other site is refused)."""
    import blueedit.module as bm
    from blueedit.module import EditingModule

    monkeypatch.setattr(bm, "load_model_and_tokenizer",
                        lambda spec, cache_dir=None: (make_model("llama"), make_tokenizer()))
    plain = EditingModule(editing=EditingConfig(layers=[1, 2, 3], strategy="boundary"), evaluate=False)
    assert "site" not in plain.settings_fingerprint()["editing"]["target"]
    mlp = EditingModule(editing=EditingConfig(layers=[1, 2, 3], strategy="boundary",
                                              target=TargetConfig(site="mlp")), evaluate=False)
    assert mlp.settings_fingerprint()["editing"]["target"]["site"] == "mlp"
