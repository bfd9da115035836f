"""General capability after editing: zero-shot GLUE-style tasks, MMLU, and perplexity.

See ``docs/algorithms.md`` §8 ("General capability") and §10 for how this differs from the
published GLUE scripts.

Zero-shot classification. Each example ``i`` becomes a prompt ``x_i`` and each class ``k`` a
label word ``w_k`` (``" positive"``, ``" Yes"``, ``" True"``, ``" A"`` ...). With ``y^k`` the
tokens of ``w_k``, the class score is the label word's log-likelihood

    s_ik = Σ_j log p(y^k_j | x_i, y^k_<j)          and the prediction is  ŷ_i = argmax_k s_ik.

All ``N · K`` (prompt, label word) pairs are scored in batches by :mod:`.scoring`. Reported, in
``[0, 1]``: ``accuracy``; for binary tasks also ``f1`` of class 1 and Matthews' ``mcc``:

    F1  = 2 TP / (2 TP + FP + FN)
    MCC = (TP · TN - FP · FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))     (0 if the root is 0)

The headline metric of a task (:attr:`GlueTask.main_metric`) is F1 for MRPC, MCC for CoLA and
accuracy otherwise, as in the published general-capability evaluations. Data files are
``<data_dir>/glue_eval/<task>.json`` (lists of dicts; see ``SOURCES.md``); a fixed subset, the
first ``n`` examples, is used so that scores are comparable across editing rounds.

Perplexity of texts ``t`` with tokens ``u_1..u_L`` (truncated to ``max_length``):

    PPL = exp( Σ_t Σ_{l=2..L_t} -log p(u_l | u_<l) / Σ_t (L_t - 1) )

(the first token, BOS when the tokenizer adds one, is only conditioned on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blueedit.config import UserInputError
from blueedit.evaluation.scoring import score_continuations, score_token_ids
from blueedit.models.tokens import pad_token_id, tokenize_target

__all__ = [
    "GlueTask",
    "TASKS",
    "DEFAULT_TASKS",
    "load_task_examples",
    "choice_scores",
    "classification_metrics",
    "evaluate_task",
    "evaluate_general",
    "perplexity",
]

_LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")


@dataclass(frozen=True)
class GlueTask:
    """A zero-shot classification task.

    Attributes:
        name: file stem in ``glue_eval/`` (``sst2``, ``mrpc`` ...).
        build_prompt: example dict -> prompt text (ends right before the label word).
        choices: example dict -> label words, index = class id (each with a leading space).
        label: example dict -> gold class id.
        main_metric: the headline metric (``accuracy``, ``f1`` or ``mcc``).
    """

    name: str
    build_prompt: Callable[[dict[str, Any]], str]
    choices: Callable[[dict[str, Any]], tuple[str, ...]]
    label: Callable[[dict[str, Any]], int]
    main_metric: str = "accuracy"


def _fixed(*words: str) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    return lambda _ex: words


def _sst2_prompt(ex: dict[str, Any]) -> str:
    return f"Review: {ex['sentence'].strip()}\nSentiment (positive or negative):"


def _mrpc_prompt(ex: dict[str, Any]) -> str:
    return (
        f"Sentence 1: {ex['sentence1'].strip()}\nSentence 2: {ex['sentence2'].strip()}\n"
        "Question: Do both sentences mean the same thing? Yes or No?\nAnswer:"
    )


def _cola_prompt(ex: dict[str, Any]) -> str:
    return (
        f"Sentence: {ex['sentence'].strip()}\n"
        "Question: Is this sentence grammatically correct? Yes or No?\nAnswer:"
    )


def _entailment_prompt(ex: dict[str, Any]) -> str:
    return f"{ex['sentence1'].strip()}\nQuestion: {ex['sentence2'].strip()} True or False?\nAnswer:"


def _nli_label(ex: dict[str, Any]) -> int:
    value = ex["label"]
    if isinstance(value, str):
        return {"entailment": 0, "not_entailment": 1}[value.strip().lower()]
    return int(value)


def _mmlu_prompt(ex: dict[str, Any]) -> str:
    subject = str(ex.get("subject", "")).replace("_", " ").strip()
    head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "".join(f"{_LETTERS[k]}. {str(c).strip()}\n" for k, c in enumerate(ex["choices"]))
    return f"{head}{ex['question'].strip()}\n{options}Answer:"


def _mmlu_choices(ex: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f" {_LETTERS[k]}" for k in range(len(ex["choices"])))


TASKS: dict[str, GlueTask] = {
    # SST-2: 1 = positive
    "sst2": GlueTask("sst2", _sst2_prompt, _fixed(" negative", " positive"), lambda ex: int(ex["label"])),
    # MRPC: 1 = paraphrase
    "mrpc": GlueTask("mrpc", _mrpc_prompt, _fixed(" No", " Yes"), lambda ex: int(ex["label"]), "f1"),
    # CoLA: 1 = acceptable
    "cola": GlueTask("cola", _cola_prompt, _fixed(" No", " Yes"), lambda ex: int(ex["label"]), "mcc"),
    # RTE (GLUE): 0 = entailment, 1 = not_entailment
    "rte": GlueTask("rte", _entailment_prompt, _fixed(" True", " False"), _nli_label),
    # NLI: "entailment" / "not_entailment"
    "nli": GlueTask("nli", _entailment_prompt, _fixed(" True", " False"), _nli_label),
    # MMLU: answer index into choices
    "mmlu": GlueTask("mmlu", _mmlu_prompt, _mmlu_choices, lambda ex: int(ex["answer"])),
}
DEFAULT_TASKS: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")


def load_task_examples(data_dir: str | Path, task: str, n: int | None = 100) -> list[dict[str, Any]]:
    """The first ``n`` examples (all when ``None``) of ``<data_dir>/glue_eval/<task>.json``.

    ``data_dir`` may also be the ``glue_eval`` folder itself.
    """
    d = Path(data_dir)
    path = d / f"{task}.json" if d.name == "glue_eval" else d / "glue_eval" / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"general-capability data {path} not found")
    examples = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(examples, list):
        raise UserInputError(f"{path}: expected a list of examples")
    return examples if n is None else examples[:n]


def choice_scores(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Log-likelihood ``s_ik`` of each label word after each prompt: ``N`` tensors of shape ``[K_i]``."""
    flat_prompts: list[str] = []
    flat_conts: list[list[int]] = []
    cache: dict[str, list[int]] = {}
    for p, words in zip(prompts, choices):
        for w in words:
            if w not in cache:
                cache[w] = tokenize_target(tokenizer, w)
            flat_prompts.append(p)
            flat_conts.append(cache[w])
    scores = score_continuations(model, tokenizer, flat_prompts, flat_conts, batch_size=batch_size)
    sums = [lp.double().sum() for lp in scores.logprobs]
    out: list[torch.Tensor] = []
    k = 0
    for words in choices:
        row = sums[k : k + len(words)]
        out.append(torch.stack(row) if row else torch.zeros(0, dtype=torch.float64))
        k += len(words)
    return out


def classification_metrics(pred: Sequence[int], gold: Sequence[int], binary: bool) -> dict[str, float]:
    """``accuracy`` and, when ``binary``, ``f1`` (class 1) and ``mcc`` (torchmetrics); ``nan`` for
    no examples.

    MCC is 0 when its denominator is 0 (a constant prediction or a single-class gold set), the
    convention of the GLUE evaluation (scikit-learn); torchmetrics substitutes a small epsilon
    there and can return values far from 0.
    """
    from torchmetrics.functional.classification import (
        binary_confusion_matrix,
        binary_f1_score,
        binary_matthews_corrcoef,
    )

    n = len(gold)
    if n == 0:
        keys = ("accuracy", "f1", "mcc") if binary else ("accuracy",)
        return {k: float("nan") for k in keys}
    preds, target = torch.as_tensor(list(pred)), torch.as_tensor(list(gold))
    out = {"accuracy": float((preds == target).double().mean())}
    if binary:
        out["f1"] = float(binary_f1_score(preds, target))
        (tn, fp), (fn, tp) = binary_confusion_matrix(preds, target).tolist()
        degenerate = 0 in (tp + fp, tp + fn, tn + fp, tn + fn)
        out["mcc"] = 0.0 if degenerate else float(binary_matthews_corrcoef(preds, target))
    return out


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: str | GlueTask,
    examples: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
) -> dict[str, float]:
    """Zero-shot metrics of one task on ``examples``.

    Returns ``accuracy`` (+ ``f1``, ``mcc`` for binary tasks), ``main`` (the headline metric's
    value) and ``num_examples``.
    """
    spec = TASKS[task] if isinstance(task, str) else task
    prompts = [spec.build_prompt(ex) for ex in examples]
    choices = [spec.choices(ex) for ex in examples]
    gold = [spec.label(ex) for ex in examples]
    scores = choice_scores(model, tokenizer, prompts, choices, batch_size=batch_size)
    pred = [int(s.argmax()) for s in scores]
    binary = all(len(c) == 2 for c in choices) and bool(choices)
    out = classification_metrics(pred, gold, binary)
    out["main"] = out[spec.main_metric] if spec.main_metric in out else out["accuracy"]
    out["num_examples"] = float(len(examples))
    return out


def evaluate_general(
    model: nn.Module,
    tokenizer,
    data_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n: int = 100,
    *,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_task` on the first ``n`` examples of each task: ``task -> metrics``."""
    return {
        t: evaluate_task(model, tokenizer, t, load_task_examples(data_dir, t, n), batch_size=batch_size)
        for t in tasks
    }


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Token-weighted perplexity of ``texts``, each truncated to ``max_length`` tokens.

    Texts with fewer than two tokens have nothing to predict and are skipped; ``nan`` when none
    is left.
    """
    if max_length < 2:
        raise UserInputError(f"max_length must be >= 2, got {max_length}")
    heads: list[list[int]] = []
    tails: list[list[int]] = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:max_length]
        if len(ids) >= 2:
            heads.append(ids[:1])
            tails.append(ids[1:])
    if not heads:
        return float("nan")
    scores = score_token_ids(
        model, heads, tails, pad_id=pad_token_id(tokenizer), batch_size=batch_size, padding_side="right"
    )
    total_nll = -sum(float(lp.double().sum()) for lp in scores.logprobs)
    n_tokens = sum(len(t) for t in tails)
    return math.exp(total_nll / n_tokens)
