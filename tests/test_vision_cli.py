"""The vision track's Lightning shape on an untrained 2-layer ViT: ``blueedit fit`` on the digits
bed, resume, ``blueedit edit --output``, the loader and ``revert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from blueedit.cli import main  # noqa: E402
from blueedit.vision.digits import apply_transform, load_digits_split  # noqa: E402
from blueedit.vision.state import is_edited_vit, load_edited, read_state  # noqa: E402
from blueedit.vision.vit import digits_vit_config, load_vit  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "vit-digits" / "refinevit.yaml")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tinyvit")
    load_vit(config=digits_vit_config(num_layers=2, hidden_size=16, intermediate_size=32)).save_pretrained(out)
    return out


def _args(tiny_dir, root, *extra):
    return ["--config", CONFIG, "--model.init_args.model.name_or_path", str(tiny_dir),
            "--model.init_args.refine.steps", "20", "--model.init_args.refine.lam", "0.01",
            "--model.init_args.refine.lr", "0.1", "--data.init_args.groups_per_transform", "1",
            "--data.init_args.edits_per_group", "2", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]


def _metrics(root: Path) -> dict:
    return json.loads(sorted(root.rglob("vision_metrics.json"))[-1].read_text())


def test_fit_runs_one_edit_per_step_and_resumes(tiny_dir, tmp_path):
    main(["fit", *_args(tiny_dir, tmp_path / "full")])
    full = _metrics(tmp_path / "full")
    assert full["mean"]["rounds"] == 8 == len(full["rounds"])  # 4 transforms x 1 group x 2 edits
    assert all(0.0 <= r[k] <= 1.0 for r in full["rounds"] for k in ("sr", "gr", "lr"))
    assert full["mean"]["sr"] > 0  # P can move the untrained model's small logits
    ckpt_full = torch.load(sorted((tmp_path / "full").rglob("*.ckpt"))[-1], weights_only=True)
    # interrupted after 3 rounds, then resumed from its checkpoint: the same rounds and the same last edit
    every_step = json.dumps([{"class_path": "blueedit.vision.callbacks.SubpopulationMetrics"},
                             {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"every_n_train_steps": 1, "save_top_k": -1}}])
    main(["fit", *_args(tiny_dir, tmp_path / "part", "--trainer.max_steps", "3", "--trainer.callbacks", every_step)])
    part_ckpt = [p for p in (tmp_path / "part").rglob("*.ckpt") if "step=3" in p.name][0]
    assert torch.load(part_ckpt, weights_only=True)["state_dict"]["last_round"].item() == 2
    main(["fit", *_args(tiny_dir, tmp_path / "resumed", "--ckpt_path", str(part_ckpt))])
    resumed = _metrics(tmp_path / "resumed")
    assert [r["round"] for r in resumed["rounds"]] == list(range(8))
    assert resumed["rounds"] == full["rounds"]
    ckpt = torch.load(sorted((tmp_path / "resumed").rglob("*.ckpt"))[-1], weights_only=True)
    for key in ("mask", "projection"):
        assert torch.equal(ckpt["state_dict"][key], ckpt_full["state_dict"][key])


def test_edit_output_load_and_revert_restore_the_original_bit_for_bit(tiny_dir, tmp_path):
    split = load_digits_split()
    x = apply_transform("inversion", split.heldout_x[:2])
    torch.save({"images": x, "labels": split.heldout_y[:2]}, tmp_path / "edits.pt")
    out = tmp_path / "edited"
    main(["edit", *_args(tiny_dir, tmp_path / "run"), "--edits", str(tmp_path / "edits.pt"), "--output", str(out)])
    assert is_edited_vit(out)
    state, record = read_state(out)
    assert record["method"] == "refinevit" and record["rounds"][0]["images"] == 2
    assert state.projection is not None and state.mask.shape == (2, 4)
    base = load_vit(str(tiny_dir))
    model, hooks = load_edited(out)
    probe = split.heldout_x[:50]
    with torch.no_grad():
        edited_logits = model(pixel_values=probe).logits
        hooks.remove()
        assert torch.equal(model(pixel_values=probe).logits, base(pixel_values=probe).logits)
    assert not torch.equal(edited_logits, base(pixel_values=probe).logits)
    with pytest.raises(SystemExit):  # continuing an edited directory would drop its edit: refused
        main(["edit", *_args(out, tmp_path / "run3"), "--edits", str(tmp_path / "edits.pt"), "--output",
              str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
    original = (tiny_dir / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == original
    main(["revert", str(out)])
    assert not is_edited_vit(out)
    assert (out / "model.safetensors").read_bytes() == original
    with pytest.raises(SystemExit):  # a second edit into the same directory needs --overwrite
        main(["edit", *_args(tiny_dir, tmp_path / "run2"), "--edits", str(tmp_path / "edits.pt"), "--output", str(out)])


def test_bad_edit_file_is_refused_before_editing(tiny_dir, tmp_path, capsys):
    x = torch.rand(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("nan")
    torch.save({"images": x, "labels": torch.tensor([1, 2])}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        main(["edit", *_args(tiny_dir, tmp_path / "run"), "--edits", str(tmp_path / "bad.pt"), "--output",
              str(tmp_path / "never")])
    assert e.value.code == 2
    assert "image 1 has non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_vit_b16_directory_edits_with_its_own_images(tmp_path):
    """The hub path (a ViT-B/16 directory, as google/vit-base-patch16-224 would be downloaded),
    on a randomly initialized model of that architecture: edit with the file's unrelated and
    locality images, save, load."""
    from blueedit.vision.vit import vit_b16_config

    torch.manual_seed(0)
    model_dir = tmp_path / "vit-b16"
    load_vit(config=vit_b16_config(num_labels=5)).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 224, 224, generator=g)
    base = load_vit(str(model_dir))
    with torch.no_grad():
        wrong = base(pixel_values=images).logits.argmax(-1)
    torch.save({"images": images, "labels": (wrong + 1) % 5, "unrelated": torch.rand(4, 3, 224, 224, generator=g),
                "locality": torch.rand(3, 3, 224, 224, generator=g)}, tmp_path / "edits.pt")
    out = tmp_path / "edited"
    main(["edit", "--config", CONFIG, "--model.init_args.model.name_or_path", str(model_dir),
          "--model.init_args.refine.score", "direct", "--model.init_args.refine.steps", "30",
          "--model.init_args.refine.lr", "0.1", "--model.init_args.refine.lam", "0.01",
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger.init_args.save_dir",
          str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
          "--edits", str(tmp_path / "edits.pt"), "--output", str(out)])
    state, _ = read_state(out)
    assert state.mask.shape == (12, 12) and state.projection.shape == (768, 768)
    edited, hooks = load_edited(out)
    with torch.no_grad():
        assert torch.equal(edited(pixel_values=images).logits.argmax(-1), (wrong + 1) % 5)


def test_digits_bed_refuses_another_image_shape_and_bad_options(tmp_path):
    from blueedit.vision.datamodule import DigitsEditDataModule, load_edit_file

    with pytest.raises(ValueError, match="data.transforms"):
        DigitsEditDataModule(transforms=["blur"])
    with pytest.raises(ValueError, match="images_per_edit 4 must be below"):
        DigitsEditDataModule(images_per_edit=4)
    torch.save({"images": torch.rand(2, 1, 8, 8), "labels": torch.tensor([1, 2]), "unrelated": torch.rand(3, 1, 4, 4)},
               tmp_path / "e.pt")
    with pytest.raises(ValueError, match="'unrelated' images are"):
        load_edit_file(tmp_path / "e.pt")
    torch.save({"images": torch.rand(2, 1, 8, 8), "labels": torch.tensor([1])}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        load_edit_file(tmp_path / "e.pt")
