"""Editing vision transformers: attention heads located, removed and refined (RefineViT).

- :mod:`~blueedit.vision.vit`: the adapter over transformers' ``ViTForImageClassification``
  (attention output projections, MLP outputs, final norm, classifier) and model construction;
- :mod:`~blueedit.vision.heads`: per-head ablation (zero or mean) and block-output ablation;
- :mod:`~blueedit.vision.refine`: head scores (total and direct effect), head selection and the
  learned projection ``P``;
- :mod:`~blueedit.vision.metrics`: SR / GR / LR;
- :mod:`~blueedit.vision.digits`: the offline test bed (scikit-learn's digits, unseen transforms);
- :mod:`~blueedit.vision.module`, :mod:`~blueedit.vision.datamodule`, :mod:`~blueedit.vision.callbacks`:
  the Lightning shape (one edit per training step), and :mod:`~blueedit.vision.state`: saving,
  loading and reverting an edited ViT.

Nothing here uses :mod:`blueedit.editing` (the language-model engine).
"""
