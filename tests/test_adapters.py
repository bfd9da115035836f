"""Layout detection and W_out access in math orientation ([d, d_k])."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blueedit.models.adapters import KNOWN_LAYOUTS, ModelAdapter, ModelLayout, UnknownArchitectureError, detect_layout
from helpers import make_model


def _tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gptj":
        cfg = tf.GPTJConfig(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_inner=40, rotary_dim=4, n_positions=32)
        return tf.GPTJForCausalLM(cfg)
    if kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=40, max_position_embeddings=32)
        return tf.GPTNeoXForCausalLM(cfg)
    if kind == "mistral":
        cfg = tf.MistralConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=40, max_position_embeddings=32)
        return tf.MistralForCausalLM(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=40, max_position_embeddings=32)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "gemma3_text":  # Gemma 3 270M's family: post-norms around the MLP, sliding-window layers
        cfg = tf.Gemma3TextConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, intermediate_size=40,
                                  max_position_embeddings=32, sliding_window=8)
        return tf.Gemma3ForCausalLM(cfg)
    raise ValueError(kind)


def test_gpt2_transposed_conv1d():
    model = make_model("gpt2")
    layout = detect_layout(model)
    assert layout.blocks == "transformer.h" and layout.w_out == "mlp.c_proj" and layout.transposed
    ad = ModelAdapter(model)
    assert ad.num_layers == 6
    assert ad.hidden_size() == 32 and ad.key_size(0) == 128
    param = ad.w_out_param(2)
    assert tuple(param.shape) == (128, 32)  # Conv1D stores [d_k, d]
    W = ad.get_w_out(2)
    assert W.shape == (32, 128)
    assert torch.equal(W, param.detach().t())
    # a copy, not a view
    W.zero_()
    assert param.abs().sum() > 0
    before = param.detach().clone()
    delta = torch.randn(32, 128, dtype=torch.float64)
    ad.add_to_w_out(2, delta)
    assert torch.allclose(param.detach(), before + delta.t().float(), atol=1e-6)
    # math orientation: W k equals the module's output without bias
    k = torch.randn(3, 128)
    mod = ad.w_out_module(2)
    with torch.no_grad():
        assert torch.allclose(mod(k) - mod.bias, k @ ad.get_w_out(2).T, atol=1e-5)
    ad.set_w_out(2, before.t())
    assert torch.equal(param.detach(), before)
    with pytest.raises(ValueError):
        ad.add_to_w_out(2, torch.zeros(128, 32))
    with pytest.raises(ValueError):
        ad.set_w_out(2, torch.zeros(128, 32))


def test_llama_layout():
    model = make_model("llama")
    layout = detect_layout(model)
    assert layout == ModelLayout("model.layers", "mlp.down_proj", "model.norm", "lm_head", attn_out="self_attn.o_proj")
    ad = ModelAdapter(model)
    assert ad.hidden_size() == 32 and ad.key_size(3) == 64
    param = ad.w_out_param(3)
    assert tuple(param.shape) == (32, 64)
    before = param.detach().clone()
    delta = torch.randn(32, 64)
    ad.add_to_w_out(3, delta)
    assert torch.allclose(param.detach(), before + delta)
    assert ad.final_norm is model.model.norm and ad.lm_head is model.lm_head
    ad.check_layers([0, 5])
    with pytest.raises(ValueError, match="out of range"):
        ad.check_layers([4, 6])


@pytest.mark.parametrize(
    "kind, blocks, w_out, norm, head",
    [
        ("gptj", "transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head"),
        ("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"),
        ("mistral", "model.layers", "mlp.down_proj", "model.norm", "lm_head"),
        ("qwen2", "model.layers", "mlp.down_proj", "model.norm", "lm_head"),
        ("gemma3_text", "model.layers", "mlp.down_proj", "model.norm", "lm_head"),
    ],
)
def test_other_architectures(kind, blocks, w_out, norm, head):
    model = _tiny(kind)
    if kind == "gemma3_text":  # a table entry, not the fallback search
        assert model.config.model_type in KNOWN_LAYOUTS
    if head == "lm_head" and not hasattr(model, "lm_head"):  # older transformers: GPT-NeoX 'embed_out'
        head = "embed_out"
    layout = detect_layout(model)
    assert (layout.blocks, layout.w_out, layout.final_norm, layout.lm_head) == (blocks, w_out, norm, head)
    assert not layout.transposed
    ad = ModelAdapter(model)
    assert ad.num_layers == 2
    assert ad.hidden_size() == 16 and ad.key_size(1) == 40
    assert ad.get_w_out(1).shape == (16, 40)
    assert isinstance(ad.w_out_module(0), nn.Linear)


class _Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "weird"})()
        self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4)) for _ in range(2)])
        self.out_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10)


def test_unknown_architecture_names_the_options():
    with pytest.raises(UnknownArchitectureError, match="model.blocks"):
        detect_layout(_Weird())
    with pytest.raises(UnknownArchitectureError, match="model.blocks"):
        ModelAdapter(_Weird())


def test_overrides_for_unknown_architecture():
    m = _Weird()
    layout = detect_layout(m, blocks="stack", w_out="1", final_norm="out_norm", lm_head="head")
    assert layout == ModelLayout("stack", "1", "out_norm", "head", transposed=False)
    ad = ModelAdapter(m, blocks="stack", w_out="1", final_norm="out_norm", lm_head="head")
    assert ad.num_layers == 2 and ad.key_size(0) == 8 and ad.hidden_size() == 4
    assert ad.w_out_module(1) is m.stack[1][1]
    # a missing part is still reported
    with pytest.raises(UnknownArchitectureError, match="model.blocks"):
        detect_layout(m, blocks="stack", w_out="1")


def test_overrides_for_known_architecture():
    model = make_model("llama")
    layout = detect_layout(model, w_out="mlp.up_proj", blocks=None)
    assert layout.w_out == "mlp.up_proj" and layout.blocks == "model.layers"
    ad = ModelAdapter(model, w_out="mlp.up_proj")
    assert ad.w_out_module(0) is model.model.layers[0].mlp.up_proj
    with pytest.raises(UnknownArchitectureError):
        detect_layout(model, final_norm="model.no_such_norm")
    with pytest.raises(UnknownArchitectureError):
        ModelAdapter(model, w_out="mlp.nothing")


def test_untied_embeddings_are_tied_after_loading():
    from blueedit.models.loading import check_tied_embeddings

    model = make_model("llama")  # tie_word_embeddings=True
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    check_tied_embeddings(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_attention_output_module():
    """PMET's attention site: the attention output projection of each block, for both layouts and
    for an unknown model type through the candidate names; a clear error names the option."""
    import pytest

    from blueedit.models.adapters import UnknownArchitectureError

    for arch, name in (("llama", "self_attn.o_proj"), ("gpt2", "attn.c_proj")):
        model = make_model(arch)
        ad = ModelAdapter(model)
        blocks = model.model.layers if arch == "llama" else model.transformer.h
        assert ad.attn_out_module(2) is blocks[2].get_submodule(name)
    model = make_model("llama")
    ad = ModelAdapter(model, layout=ModelLayout("model.layers", "mlp.down_proj", "model.norm", "lm_head"))
    assert ad.attn_out_module(1) is model.model.layers[1].self_attn.o_proj
    ad = ModelAdapter(model, layout=ModelLayout("model.layers", "mlp.down_proj", "model.norm", "lm_head",
                                                attn_out="self_attn.nothing"))
    with pytest.raises(UnknownArchitectureError, match="model.attn_out"):
        ad.attn_out_module(1)
