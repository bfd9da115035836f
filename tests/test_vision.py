"""The vision track on an untrained 2-layer ViT: head ablation, the CLS decomposition, scores,
the projection P, SR/GR/LR, the adapter's layouts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from blueedit.vision.heads import EditHooks, ablate_heads, head_input_means, zeroed_block_output
from blueedit.vision.metrics import generalization_rate, locality_rate, success_rate, top2_gap
from blueedit.vision.refine import (
    RefineConfig,
    cls_decomposition,
    direct_effect_scores,
    fit_projection,
    layer_norm_vjp,
    margin,
    projection_closed_form,
    projection_objective,
    refine_edit,
    select_greedy,
    select_top_k,
    total_effect_scores,
)
from blueedit.vision.vit import AdapterError, ViTAdapter, digits_vit_config, load_vit, vit_b16_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = load_vit(config=digits_vit_config(num_layers=2, num_heads=4, hidden_size=16, intermediate_size=32))
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _o_proj_inputs(adapter, x):
    seen = {}
    handles = [adapter.o_proj(l).register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].clone()))
               for l in range(adapter.num_layers)]
    with torch.no_grad():
        adapter.model(pixel_values=x)
    for h in handles:
        h.remove()
    return seen


def test_ablating_a_head_changes_exactly_its_slice(tiny, images):
    adapter = ViTAdapter.of(tiny)
    before = _o_proj_inputs(adapter, images)
    hooks = EditHooks(adapter)
    try:
        hooks.mask[1, 2] = True
        seen = {}
        handle = adapter.o_proj(1).register_forward_hook(lambda m, a, o: seen.__setitem__("z", a[0].clone()))
        with torch.no_grad():
            tiny(pixel_values=images)
        handle.remove()
    finally:
        hooks.remove()
    d_h = adapter.head_dim
    z = seen["z"]
    assert torch.equal(z[..., 2 * d_h:3 * d_h], torch.zeros_like(z[..., 2 * d_h:3 * d_h]))
    assert torch.equal(z[..., :2 * d_h], before[1][..., :2 * d_h])
    assert torch.equal(z[..., 3 * d_h:], before[1][..., 3 * d_h:])
    assert not torch.equal(before[1][..., 2 * d_h:3 * d_h], torch.zeros_like(z[..., :d_h]))


def test_mean_ablation_puts_the_reference_mean_in_the_slice(tiny, images):
    adapter = ViTAdapter.of(tiny)
    means = head_input_means(adapter, images)
    assert torch.allclose(means[0], _o_proj_inputs(adapter, images)[0].mean(0), atol=1e-6)
    z = torch.randn(3, 17, 16)
    out = ablate_heads(z, torch.tensor([False, True, False, False]), 4, means[0])
    assert torch.equal(out[..., 4:8], means[0][:, 4:8].expand(3, -1, -1))
    assert torch.equal(out[..., :4], z[..., :4]) and torch.equal(out[..., 8:], z[..., 8:])


def test_total_effect_matches_zeroing_the_heads_columns_of_w_o(tiny, images):
    """Oracle: removing head (l, h) = zeroing its columns of W_O in a copy of the model."""
    adapter = ViTAdapter.of(tiny)
    y = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        logits = tiny(pixel_values=images).logits
    wrong = torch.tensor([5, 6, 7, 8, 9])
    hooks = EditHooks(adapter)
    try:
        def margins(mask):
            with hooks.masked(mask), torch.no_grad():
                return margin(tiny(pixel_values=images).logits, y, wrong)
        scores = total_effect_scores(margins, 2, 4)
    finally:
        hooks.remove()
    base = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]
    for l, h in [(0, 0), (1, 3)]:
        other = copy.deepcopy(tiny)
        w = ViTAdapter.of(other).o_proj(l).weight
        with torch.no_grad():
            w[:, h * 4:(h + 1) * 4] = 0
            out = other(pixel_values=images).logits
        expected = (out.gather(1, y[:, None])[:, 0] - out.gather(1, wrong[:, None])[:, 0] - base).mean()
        assert math.isclose(float(scores[l, h]), float(expected), rel_tol=1e-4, abs_tol=1e-6)


def test_direct_effect_decomposition_sums_to_the_cls_state(tiny, images):
    adapter = ViTAdapter.of(tiny)
    dec = cls_decomposition(adapter, images)
    assert dec.heads.shape == (5, 2, 4, 16)
    assert torch.allclose(dec.total(), dec.final, atol=1e-5)
    with torch.no_grad():
        out = tiny(pixel_values=images, output_hidden_states=True)
    assert torch.allclose(dec.logits, out.logits)


def test_layer_norm_vjp_is_the_gradient_and_direct_scores_the_linearization(tiny, images):
    torch.manual_seed(3)
    h, v = torch.randn(4, 16), torch.randn(4, 16)
    ln = nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    hh = h.clone().requires_grad_(True)
    (ln(hh) * v).sum().backward()
    assert torch.allclose(layer_norm_vjp(h, ln.weight.detach(), 1e-5, v), hh.grad, atol=1e-5)
    # the direct score is -d margin / d(head term) . head term: check with autograd on the final norm
    adapter = ViTAdapter.of(tiny)
    dec = cls_decomposition(adapter, images)
    y, wrong = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9])
    final = dec.final.clone().requires_grad_(True)
    logits = adapter.classifier(adapter.final_norm(final))
    margin(logits, y, wrong).sum().backward()
    expected = -torch.einsum("nlhd,nd->lh", dec.heads, final.grad) / 5
    norm = adapter.final_norm
    got = direct_effect_scores(dec, norm.weight.detach(), norm.eps, adapter.classifier.weight.detach(), y, wrong)
    assert torch.allclose(got, expected, atol=1e-5)


def test_identity_projection_changes_nothing(tiny, images):
    adapter = ViTAdapter.of(tiny)
    with torch.no_grad():
        before = tiny(pixel_values=images).logits
    hooks = EditHooks(adapter)
    try:
        hooks.projection = torch.eye(16)
        with torch.no_grad():
            after = tiny(pixel_values=images).logits
    finally:
        hooks.remove()
    assert torch.equal(before, after)


def test_closed_form_projection_solves_its_normal_equations_and_adam_reaches_it():
    g = torch.Generator().manual_seed(0)
    r_tilde = torch.randn(40, 6, generator=g, dtype=torch.float64)
    r = r_tilde @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.1 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    for lam, rho in [(1.0, 0.0), (0.5, 0.3)]:
        P = projection_closed_form(r_tilde, r, lam, rho)
        m = len(r)
        lhs = P @ ((lam / m) * r_tilde.T @ r_tilde + rho * torch.eye(6, dtype=torch.float64))
        rhs = (lam / m) * r.T @ r_tilde + rho * torch.eye(6, dtype=torch.float64)
        assert torch.allclose(lhs, rhs, atol=1e-10)
        # the gradient of the objective vanishes there
        Pg = P.clone().requires_grad_(True)
        projection_objective(Pg, r_tilde[:0], torch.zeros(0, dtype=torch.long), torch.zeros(3, 6, dtype=torch.float64),
                             None, r_tilde, r, lam, rho, ce_weight=0.0).backward()
        assert Pg.grad.abs().max() < 1e-10
    fitted = fit_projection(r_tilde.float(), torch.zeros(0, dtype=torch.long), torch.zeros(3, 6), None, r_tilde.float(),
                            r.float(), lam=1.0, rho=0.3, steps=1500, lr=2e-2, ce_weight=0.0)
    assert torch.allclose(fitted, projection_closed_form(r_tilde, r, 1.0, 0.3).float(), atol=2e-3)


def test_selection_rules():
    scores = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    assert select_top_k(scores, 2).tolist() == [[True, False], [True, False]]
    assert select_top_k(scores, 4).tolist() == [[True, False], [True, True]]  # never a negative score
    calls = []

    def corrected(mask):
        calls.append(int(mask.sum()))
        return torch.tensor([int(mask.sum()) >= 2])
    assert select_greedy(scores, corrected, max_heads=4).tolist() == [[True, False], [True, False]]
    assert calls == [1, 2]
    assert int(select_greedy(scores, lambda m: torch.tensor([False]), max_heads=1).sum()) == 1


def test_metrics_on_hand_made_predictions():
    assert success_rate(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    pred, y = torch.tensor([4, 4, 1, 4, 2]), torch.tensor([4, 4, 4, 4, 4])
    edited = torch.tensor([True, False, False, False, False])
    assert generalization_rate(pred, y, edited) == pytest.approx(2 / 4)  # the edit image itself not counted
    assert math.isnan(generalization_rate(pred[:1], y[:1], edited[:1]))
    assert locality_rate(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    assert top2_gap(torch.tensor([[0.0, 0.0, -50.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_refine_edit_corrects_and_leaves_weights_untouched(tiny, images):
    adapter = ViTAdapter.of(tiny)
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        pred = tiny(pixel_values=images[:2]).logits.argmax(-1)
    y = (pred + 1) % 10
    hooks = EditHooks(adapter)
    try:
        for score in ("total", "direct"):
            state = refine_edit(hooks, images[:2], y, torch.rand(30, 1, 8, 8), RefineConfig(score=score, k=1, lam=0.01, steps=300, lr=0.05))
            assert state.mask.sum() <= 1 and state.projection.shape == (16, 16)
            with torch.no_grad():
                assert torch.equal(tiny(pixel_values=images[:2]).logits.argmax(-1), y)
    finally:
        hooks.remove()
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in weights.items())


def test_block_output_zeroing(tiny, images):
    adapter = ViTAdapter.of(tiny)
    with zeroed_block_output(adapter, 1, "mlp"):
        dec = cls_decomposition(adapter, images)
    assert torch.equal(dec.mlp[:, 1], torch.zeros_like(dec.mlp[:, 1]))
    with pytest.raises(ValueError, match="part"):
        with zeroed_block_output(adapter, 0, "ffn"):
            pass


class _Legacy(nn.Module):
    """The transformers 4.x module layout (names only) of a ViT image classifier."""

    def __init__(self, layers=3, d=8, heads=2):
        super().__init__()

        def ns(**kw):
            m = nn.Module()
            for k, v in kw.items():
                setattr(m, k, v)
            return m
        self.config = type("C", (), {"num_attention_heads": heads})()
        blocks = nn.ModuleList(ns(attention=ns(output=ns(dense=nn.Linear(d, d))), intermediate=ns(dense=nn.Linear(d, 2 * d)),
                                  output=ns(dense=nn.Linear(2 * d, d))) for _ in range(layers))
        self.vit = ns(encoder=ns(layer=blocks), layernorm=nn.LayerNorm(d))
        self.classifier = nn.Linear(d, 3)


def test_adapter_resolves_both_transformers_layouts(tiny):
    new = ViTAdapter.of(tiny)
    assert new.layout == "transformers-5" and (new.num_layers, new.num_heads, new.head_dim) == (2, 4, 4)
    assert new.o_proj(1) is tiny.vit.layers[1].attention.o_proj and new.mlp_out(0) is tiny.vit.layers[0].mlp.fc2
    legacy = _Legacy()
    old = ViTAdapter.of(legacy)
    assert old.layout == "transformers-4" and (old.num_layers, old.num_heads, old.head_dim) == (3, 2, 4)
    assert old.o_proj(2) is legacy.vit.encoder.layer[2].attention.output.dense
    assert old.mlp_in(0) is legacy.vit.encoder.layer[0].intermediate.dense
    assert old.mlp_out(1) is legacy.vit.encoder.layer[1].output.dense
    with pytest.raises(AdapterError, match="not a ViTForImageClassification"):
        ViTAdapter.of(nn.Linear(2, 2))
    with pytest.raises(IndexError, match="out of range"):
        new.o_proj(2)


def test_vit_b16_architecture_from_a_config():
    """The hub path's architecture (google/vit-base-patch16-224), randomly initialized offline."""
    model = load_vit(config=vit_b16_config(num_labels=10))
    adapter = ViTAdapter.of(model)
    assert (adapter.num_layers, adapter.num_heads, adapter.head_dim) == (12, 12, 64)
    hooks = EditHooks(adapter)
    try:
        hooks.mask[11, 0] = True
        with torch.no_grad():
            out = model(pixel_values=torch.rand(1, 3, 224, 224)).logits
    finally:
        hooks.remove()
    assert out.shape == (1, 10)
    with pytest.raises(ValueError, match="either"):
        load_vit()


def test_transforms_and_augmentation():
    from blueedit.vision.digits import apply_transform, random_small_shift

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 2] = 1.0
    assert apply_transform("shift", x)[0, 0, 3, 4] == 1.0
    assert apply_transform("rotation", x)[0, 0, 5, 1] == 1.0  # 90 degrees counter-clockwise: (r, c) -> (7 - c, r)
    assert int(apply_transform("dilation", x).sum()) == 9
    assert torch.equal(apply_transform("inversion", x), 1 - x)
    with pytest.raises(ValueError, match="transform 'blur'"):
        apply_transform("blur", x)
    shifted = random_small_shift(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(shifted[:, 0], as_tuple=True)[1:]
    assert shifted.sum(dim=(1, 2, 3)).eq(1).all()  # every pixel kept (none falls off: it is 1 away from the edge)
    assert set(rows.tolist()) == {0, 1, 2} and set(cols.tolist()) == {1, 2, 3}


def test_bed_groups_are_failures_of_one_class_under_one_transform(tiny):
    from blueedit.vision.digits import DigitsSplit, build_bed, predict

    g = torch.Generator().manual_seed(0)
    split = DigitsSplit(torch.rand(20, 1, 8, 8, generator=g), torch.arange(20) % 10,
                        torch.rand(60, 1, 8, 8, generator=g), torch.arange(60) % 10)
    bed = build_bed(tiny, split, transforms=("inversion",), min_size=2, groups_per_transform=3, sensitive_gap=0.5)
    assert 0 < len(bed.groups) <= 3
    sizes = [len(gr.y) for gr in bed.groups]
    assert sizes == sorted(sizes, reverse=True)
    for gr in bed.groups:
        assert gr.transform == "inversion" and (gr.y == gr.label).all()
        assert (predict(tiny, gr.x) != gr.y).all()
    assert (predict(tiny, bed.locality_x) == bed.locality_y).all()
