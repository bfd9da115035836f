"""The offline test bed: scikit-learn's bundled 8x8 digits, a small ViT trained on clean images,
and subpopulation groups of (transform, class) failures under transforms never seen in training.

Images are ``[n, 1, 8, 8]`` floats in ``[0, 1]`` (the digits' 0..16 grey levels divided by 16).
Transforms (pure, on such tensors):

- ``shift``: roll by (2, 2) pixels (wrapping);
- ``rotation``: 90 degrees counter-clockwise;
- ``dilation``: strokes thickened by a 3x3 maximum;
- ``inversion``: ``1 - x``.

Training sees only clean images with +-1-pixel zero-filled shifts (augmentation), so every
transform above is unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TRANSFORMS: tuple[str, ...] = ("shift", "rotation", "dilation", "inversion")


def shift(x: torch.Tensor) -> torch.Tensor:
    """Roll ``[n, c, h, w]`` images by 2 pixels down and 2 right (wrapping)."""
    return torch.roll(x, shifts=(2, 2), dims=(-2, -1))


def rotation(x: torch.Tensor) -> torch.Tensor:
    """Rotate ``[n, c, h, w]`` images by 90 degrees counter-clockwise."""
    return torch.rot90(x, k=1, dims=(-2, -1))


def dilation(x: torch.Tensor) -> torch.Tensor:
    """Grey-level dilation by a 3x3 square: each pixel becomes the maximum of its neighbourhood."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def inversion(x: torch.Tensor) -> torch.Tensor:
    """``1 - x`` for images in ``[0, 1]``."""
    return 1.0 - x


TRANSFORM_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "shift": shift, "rotation": rotation, "dilation": dilation, "inversion": inversion}


def apply_transform(name: str, x: torch.Tensor) -> torch.Tensor:
    if name not in TRANSFORM_FUNCTIONS:
        raise ValueError(f"transform {name!r} is not one of {', '.join(TRANSFORMS)}")
    return TRANSFORM_FUNCTIONS[name](x)


def random_small_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: every image shifted by its own (dy, dx) in {-1, 0, 1}^2, zero-filled."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    d = torch.randint(0, 3, (n, 2), generator=generator)
    rows = (d[:, 0, None] + torch.arange(h)[None, :])  # [n, h] rows of the padded image
    cols = (d[:, 1, None] + torch.arange(w)[None, :])
    idx_n = torch.arange(n)[:, None, None]
    out = padded[idx_n, :, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass
class DigitsSplit:
    """The digits split once by a fixed permutation: ``train`` (model training, the unrelated
    images ``U`` of the projection, mean-ablation references) and ``heldout`` (groups and locality)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor


def load_digits_split(heldout: int = 497, seed: int = 0) -> DigitsSplit:
    """scikit-learn's ``load_digits`` (1,797 images) as tensors, split by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the optional extra
        raise ImportError("the digits test bed needs scikit-learn: pip install 'blueedit[vision]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if not 0 < heldout < len(y):
        raise ValueError(f"heldout {heldout} must be between 1 and {len(y) - 1}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, ho = perm[heldout:], perm[:heldout]
    return DigitsSplit(x[tr], y[tr], x[ho], y[ho])


@dataclass
class TrainConfig:
    """How the digits ViT is trained (decides the checkpoint; its hash names the cache entry)."""

    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    """``$BLUEEDIT_CACHE`` or ``~/.cache/blueedit``."""
    return Path(os.environ.get("BLUEEDIT_CACHE", "~/.cache/blueedit")).expanduser()


def checkpoint_dir(cfg: TrainConfig, cache_root: str | Path | None = None) -> Path:
    return Path(cache_root or default_cache_root()) / "vision" / f"digits-vit-{cfg.key()}"


def train_digits_vit(cfg: TrainConfig, split: DigitsSplit, log_every: int = 200):
    """Train a :func:`~blueedit.vision.vit.digits_vit_config` model on the clean training images
    (AdamW, cosine schedule, +-1-pixel shifts); returns the model in eval mode."""
    from transformers import ViTForImageClassification

    from blueedit.vision.vit import digits_vit_config

    torch.manual_seed(cfg.seed)
    model = ViTForImageClassification(digits_vit_config(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(split.train_y), (cfg.batch_size,), generator=gen)
        x = random_small_shift(split.train_x[idx], gen)
        loss = F.cross_entropy(model(pixel_values=x).logits, split.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return logits_of(model, x, batch_size).argmax(-1)


@torch.no_grad()
def logits_of(model, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model(pixel_values=x[i:i + batch_size]).logits for i in range(0, len(x), batch_size)])


def load_or_train(cfg: TrainConfig | None = None, cache_root: str | Path | None = None, split_seed: int = 0):
    """The trained digits ViT from the cache (``<cache>/vision/digits-vit-<hash>``), trained and
    saved there (atomically: written beside it and renamed) when absent. Returns ``(model, dir)``."""
    from transformers import ViTForImageClassification

    cfg = cfg or TrainConfig()
    out = checkpoint_dir(cfg, cache_root)
    if (out / "config.json").is_file():
        return ViTForImageClassification.from_pretrained(out).eval(), out
    split = load_digits_split(seed=split_seed)
    start = time.time()
    model = train_digits_vit(cfg, split)
    seconds = time.time() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    info = {"train": asdict(cfg), "split_seed": split_seed, "train_seconds": round(seconds, 1),
            "clean_heldout_accuracy": accuracy(model, split.heldout_x, split.heldout_y),
            "transformed_heldout_accuracy": {t: accuracy(model, apply_transform(t, split.heldout_x), split.heldout_y)
                                             for t in TRANSFORMS}}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if out.exists():  # another process cached the same settings meanwhile: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return ViTForImageClassification.from_pretrained(out).eval(), out


@dataclass
class Group:
    """One subpopulation: the held-out images of class ``label`` under ``transform`` that the base
    model gets wrong (``x``: ``[n, 1, 8, 8]``, ``y``: ``[n]``, all equal to ``label``)."""

    transform: str
    label: int
    x: torch.Tensor
    y: torch.Tensor

    @property
    def name(self) -> str:
        return f"{self.transform}/{self.label}"


@dataclass
class Bed:
    """The editing bed of one trained model: the groups, the locality set (clean held-out images
    the model gets right), its sensitive subset (top-2 probability gap below ``sensitive_gap``) and
    the unrelated training images ``U`` (for ``P`` and mean ablation)."""

    groups: list[Group]
    locality_x: torch.Tensor
    locality_y: torch.Tensor
    sensitive: torch.Tensor
    unrelated_x: torch.Tensor


@torch.no_grad()
def build_bed(model, split: DigitsSplit, transforms: tuple[str, ...] = TRANSFORMS, min_size: int = 4,
              groups_per_transform: int | None = None, sensitive_gap: float = 0.5) -> Bed:
    """Groups of at least ``min_size`` failures per (transform, class); per transform the
    ``groups_per_transform`` largest (ties: the smaller class first), all when None."""
    from blueedit.vision.metrics import top2_gap

    groups: list[Group] = []
    for t in transforms:
        x = apply_transform(t, split.heldout_x)
        wrong = predict(model, x) != split.heldout_y
        found = []
        for c in range(int(split.heldout_y.max()) + 1):
            sel = wrong & (split.heldout_y == c)
            if int(sel.sum()) >= min_size:
                found.append(Group(t, c, x[sel], split.heldout_y[sel]))
        found.sort(key=lambda g: (-len(g.y), g.label))
        groups += found[:groups_per_transform] if groups_per_transform else found
    logits = logits_of(model, split.heldout_x)
    right = logits.argmax(-1) == split.heldout_y
    loc_x, loc_y = split.heldout_x[right], split.heldout_y[right]
    return Bed(groups, loc_x, loc_y, top2_gap(logits[right]) < sensitive_gap, split.train_x)
