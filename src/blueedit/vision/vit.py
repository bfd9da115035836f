"""Where the parts of a transformers ``ViTForImageClassification`` live, across versions.

transformers 5.x names a block's parts ``vit.layers.N.attention.o_proj`` and ``mlp.fc1`` /
``mlp.fc2``; 4.x names them ``vit.encoder.layer.N.attention.output.dense``,
``intermediate.dense`` and ``output.dense``. :class:`ViTAdapter` resolves either layout to:

- ``o_proj(l)``: the attention output projection ``W_O^l`` of block ``l`` (``nn.Linear`` of
  ``d -> d``); its input is the concatenation of the heads' outputs, head ``h`` at columns
  ``h*d_h:(h+1)*d_h``, and its output is the block's attention output before the residual add;
- ``mlp_in(l)`` / ``mlp_out(l)``: the MLP's two linears; ``mlp_out(l)``'s output is the MLP's
  contribution before the residual add;
- ``final_norm`` (the LayerNorm before the classifier) and ``classifier`` (``W``, ``[C, d]``).

Both layouts are pre-norm: ``h_{l+1} = h_l + a_l + m_l`` with ``a_l`` the o_proj output and
``m_l`` the MLP output, so the final CLS state is the embedding plus the sum of every block's
attention and MLP outputs at the CLS position (token 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: (layer list, o_proj, mlp_in, mlp_out) dotted paths per transformers layout.
LAYOUTS: dict[str, tuple[str, str, str, str]] = {
    "transformers-5": ("vit.layers", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    "transformers-4": ("vit.encoder.layer", "attention.output.dense", "intermediate.dense", "output.dense"),
}


class AdapterError(ValueError):
    """The model is not a ViT image classifier this adapter knows."""


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class ViTAdapter:
    """The parts of a ViT classifier that editing touches (see the module docstring)."""

    model: nn.Module
    layout: str
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> ViTAdapter:
        for name, (layers, o_proj, _, mlp_out) in LAYOUTS.items():
            blocks = _get(model, layers)
            if blocks is None or len(blocks) == 0:
                continue
            if _get(blocks[0], o_proj) is None or _get(blocks[0], mlp_out) is None:
                continue
            config = getattr(model, "config", None)
            heads = getattr(config, "num_attention_heads", None)
            d = _get(blocks[0], o_proj).in_features
            if not heads or d % heads:
                raise AdapterError(f"{type(model).__name__}: num_attention_heads {heads} does not divide d = {d}")
            if _get(model, "vit.layernorm") is None or _get(model, "classifier") is None:
                raise AdapterError(f"{type(model).__name__}: no vit.layernorm / classifier (not an image classifier)")
            return cls(model, name, len(blocks), int(heads), d // int(heads))
        raise AdapterError(f"{type(model).__name__} is not a ViTForImageClassification this adapter knows "
                           f"(looked for {', '.join(v[0] for v in LAYOUTS.values())})")

    def block(self, layer: int) -> nn.Module:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"block {layer} out of range 0..{self.num_layers - 1}")
        return _get(self.model, LAYOUTS[self.layout][0])[layer]

    def o_proj(self, layer: int) -> nn.Linear:
        return _get(self.block(layer), LAYOUTS[self.layout][1])

    def mlp_in(self, layer: int) -> nn.Linear:
        return _get(self.block(layer), LAYOUTS[self.layout][2])

    def mlp_out(self, layer: int) -> nn.Linear:
        return _get(self.block(layer), LAYOUTS[self.layout][3])

    @property
    def final_norm(self) -> nn.LayerNorm:
        return _get(self.model, "vit.layernorm")

    @property
    def classifier(self) -> nn.Linear:
        return _get(self.model, "classifier")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim


def digits_vit_config(num_layers: int = 4, num_heads: int = 4, hidden_size: int = 64,
                      intermediate_size: int = 128, num_labels: int = 10):
    """The test bed's ViT: 8x8 one-channel images, 2x2 patches (16 patches + CLS)."""
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden_size,
                     num_hidden_layers=num_layers, num_attention_heads=num_heads,
                     intermediate_size=intermediate_size, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def vit_b16_config(num_labels: int = 1000):
    """ViT-B/16's architecture (224x224, 16x16 patches, 12 blocks x 12 heads, d = 768): what
    ``google/vit-base-patch16-224`` has, for building a random model of that shape offline."""
    from transformers import ViTConfig

    return ViTConfig(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, num_labels=num_labels)


def load_vit(name_or_path: str | None = None, config=None):
    """A ``ViTForImageClassification`` in eval mode: from a local directory or hub id
    (``google/vit-base-patch16-224``; downloaded by transformers when online), or randomly
    initialized from ``config`` (no download). Exactly one of the two."""
    from transformers import ViTForImageClassification

    if (name_or_path is None) == (config is None):
        raise ValueError("load_vit: give either name_or_path or config")
    if config is not None:
        return ViTForImageClassification(config).eval()
    return ViTForImageClassification.from_pretrained(name_or_path).eval()
