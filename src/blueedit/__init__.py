"""blueedit: locate-then-edit knowledge editing with BLUE (Boundary Layer UpdatE).

The user-facing names are importable from here (``from blueedit import Editor, EditingConfig``);
they are imported on first use, so ``import blueedit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # configuration
    "ModelConfig": "blueedit.models.loading",
    "EditingConfig": "blueedit.editing.editor",
    "TargetConfig": "blueedit.editing.targets",
    "StatsConfig": "blueedit.editing.statistics",
    "GenerationMetricsConfig": "blueedit.evaluation.generation",
    # models
    "load_model_and_tokenizer": "blueedit.models.loading",
    "ModelAdapter": "blueedit.models.adapters",
    # data
    "EditRequest": "blueedit.data.records",
    "load_requests": "blueedit.data.formats",
    "model_sampled_texts": "blueedit.models.sampling",
    "load_corpus_texts": "blueedit.data.corpus",
    # editing
    "Editor": "blueedit.editing.editor",
    "EditorState": "blueedit.editing.editor",
    "RoundReport": "blueedit.editing.editor",
    "key_statistics": "blueedit.editing.statistics",
    "generate_context_templates": "blueedit.editing.targets",
    # evaluation
    "evaluate_requests": "blueedit.evaluation.editing_metrics",
    # Lightning
    "EditingModule": "blueedit.module",
    "EditDataModule": "blueedit.data.datamodule",
    "main": "blueedit.cli",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'blueedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from blueedit.cli import main
    from blueedit.data.corpus import load_corpus_texts
    from blueedit.data.datamodule import EditDataModule
    from blueedit.data.formats import load_requests
    from blueedit.data.records import EditRequest
    from blueedit.editing.editor import EditingConfig, Editor, EditorState, RoundReport
    from blueedit.editing.statistics import StatsConfig, key_statistics
    from blueedit.editing.targets import TargetConfig, generate_context_templates
    from blueedit.evaluation.editing_metrics import evaluate_requests
    from blueedit.evaluation.generation import GenerationMetricsConfig
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer
    from blueedit.models.sampling import model_sampled_texts
    from blueedit.module import EditingModule
