"""Batched, padding-correct scoring of continuations under a causal LM.

For a prompt ``x`` (token ids ``x_1..x_P``) and a continuation ``y = y_1..y_J`` the model is run
once on the concatenation ``x ⊕ y`` and the per-token log-probabilities are

    log p(y_j | x, y_<j) = log_softmax(z_{P+j-1})[y_j],      j = 1..J,

where ``z_t`` are the logits at position ``t`` (0-based positions, the token at position ``p`` is
predicted by the logits at ``p - 1``; :class:`~blueedit.models.tokens.PromptBatch` reports these
positions in ``target_index``). From them:

    mean-token NLL      = -(1/J) Σ_j log p(y_j | x, y_<j)
    teacher-forced acc  =  (1/J) Σ_j 1[argmax z_{P+j-1} = y_j]

Many (prompt, continuation) pairs are scored per forward pass: pairs are sorted by length (less
padding), cut into chunks of ``batch_size``, padded on either side with explicit ``position_ids``
and ``attention_mask`` (so the padding side does not change the result), and the original order
is restored at the end. When the model is a Hugging Face causal LM whose logits are a plain
linear read-out of the final hidden state, only the hidden states at the ``target_index``
positions go through the output head (``[n_targets, V]`` instead of ``[B, T, V]`` logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from blueedit.models.tokens import PromptBatch, encode_prompt, gather_positions, pad_batch, pad_token_id

__all__ = [
    "ContinuationScores",
    "score_continuations",
    "score_token_ids",
    "continuation_logprobs",
    "mean_token_nll",
    "token_accuracy",
    "model_device",
]

# config attributes that make the logits more than ``lm_head(h)`` (soft-capping, scaling)
_NONLINEAR_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


@dataclass
class ContinuationScores:
    """Scores of ``N`` continuations, in the order they were given.

    Attributes:
        logprobs: ``N`` float32 CPU tensors; ``logprobs[i]`` has shape ``[J_i]`` with
            ``log p(y_j | x, y_<j)`` for each continuation token.
        correct: ``N`` bool CPU tensors of shape ``[J_i]``: whether the top-1 token at each
            predicting position equals the continuation token (teacher forcing).
    """

    logprobs: list[torch.Tensor]
    correct: list[torch.Tensor]
    #: ``N`` long CPU tensors ``[J_i]``: the top-1 token id at each predicting position
    predicted: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_nll(self) -> torch.Tensor:
        """``[N]`` mean over tokens of ``-log p``."""
        return torch.stack([-lp.mean() for lp in self.logprobs]) if self.logprobs else torch.zeros(0)

    @property
    def accuracy(self) -> torch.Tensor:
        """``[N]`` fraction of continuation tokens predicted top-1."""
        if not self.correct:
            return torch.zeros(0)
        return torch.stack([c.float().mean() for c in self.correct])


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _linear_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, head)`` when ``logits = head(backbone(...).last_hidden_state)``, else ``None``."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if base is None or base is model or get_head is None:
        return None
    head = get_head()
    if head is None:
        return None
    cfg = getattr(model, "config", None)
    if cfg is not None and any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _NONLINEAR_HEAD_ATTRS):
        return None
    return base, head


def _target_logits(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    """Logits at the predicting positions: ``[B, J, V]`` (float32).

    Uses the backbone + output head on gathered hidden states when possible, otherwise gathers
    from the full ``[B, T, V]`` logits.
    """
    split = _linear_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(**batch.model_inputs(), use_cache=False).last_hidden_state  # [B, T, D]
        h = gather_positions(hidden, batch.target_index)  # [B, J, D]
        return head(h).float()
    logits = model(**batch.model_inputs()).logits  # [B, T, V]
    return gather_positions(logits, batch.target_index).float()


@torch.no_grad()
def score_token_ids(
    model: nn.Module,
    prompt_ids: list[list[int]],
    continuations: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 32,
    padding_side: str = "right",
    progress: str | None = None,
) -> ContinuationScores:
    """Like :func:`score_continuations` for prompts that are already token ids.

    Args:
        prompt_ids: ``N`` non-empty lists of prompt token ids (with BOS when the model wants one).
        continuations: ``N`` non-empty lists of continuation token ids.
        pad_id: the id written into padded slots (masked out, never scored).
        progress: a progress bar over the pairs with this description (``None``: no bar).
    """
    if len(prompt_ids) != len(continuations):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuations)} continuations")
    for i, (p, c) in enumerate(zip(prompt_ids, continuations)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens")
        if len(c) == 0:
            raise ValueError(f"continuation {i} is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(prompt_ids)
    logprobs: list[torch.Tensor] = [torch.zeros(0)] * n
    correct: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * n
    predicted: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * n
    device = model_device(model)
    # sort by row length so each chunk pads little; the original order is restored below
    order = sorted(range(n), key=lambda i: (len(prompt_ids[i]) + len(continuations[i]), i))
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=progress, unit="prompt", leave=False)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = pad_batch(
            [list(prompt_ids[i]) for i in idx],
            [-1] * len(idx),
            [list(continuations[i]) for i in idx],
            pad_id=pad_id,
            padding_side=padding_side,
        ).to(device)
        logits = _target_logits(model, batch)  # [b, J, V]
        logp_all = torch.log_softmax(logits, dim=-1)
        lp = logp_all.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1).cpu()  # [b, J]
        top = logits.argmax(dim=-1)  # [b, J]
        hit = (top == batch.target_ids).cpu()
        top = top.cpu()
        lens = batch.target_mask.sum(-1).tolist()
        for row, i in enumerate(idx):
            logprobs[i] = lp[row, : lens[row]].clone()
            correct[i] = hit[row, : lens[row]].clone()
            predicted[i] = top[row, : lens[row]].clone()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return ContinuationScores(logprobs, correct, predicted)


def score_continuations(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    continuations: list[list[int]],
    *,
    batch_size: int = 32,
    padding_side: str | None = None,
    progress: str | None = None,
) -> ContinuationScores:
    """Per-token log-probs and top-1 hits of ``continuations[i]`` after ``prompts[i]``, in one pass.

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=, position_ids=)`` and
            returning an object with ``.logits`` ``[B, T, V]``.
        tokenizer: the model's tokenizer; prompts are tokenized with its special tokens (BOS kept).
        prompts: ``N`` plain prompt strings (no ``{}`` filling).
        continuations: ``N`` lists of token ids (e.g. from ``tokenize_target``), each non-empty.
        batch_size: pairs per forward pass.
        padding_side: ``"left"``/``"right"``; defaults to the tokenizer's.
        progress: a progress bar over the pairs with this description (``None``: no bar).

    Returns:
        :class:`ContinuationScores` with float32 / bool CPU tensors in input order.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for i, c in enumerate(continuations):
        if len(c) == 0:
            raise ValueError(f"continuation {i} (after prompt {prompts[i]!r}) is empty")
    prompt_ids = [encode_prompt(tokenizer, p, None)[0] for p in prompts]
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    return score_token_ids(
        model,
        prompt_ids,
        continuations,
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        padding_side=side,
        progress=progress,
    )


def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    continuations: list[list[int]],
    *,
    batch_size: int = 32,
    padding_side: str | None = None,
) -> list[torch.Tensor]:
    """``log p(y_j | x, y_<j)`` per continuation token: ``N`` float32 CPU tensors of shape ``[J_i]``."""
    return score_continuations(
        model, tokenizer, prompts, continuations, batch_size=batch_size, padding_side=padding_side
    ).logprobs


def mean_token_nll(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    continuations: list[list[int]],
    *,
    batch_size: int = 32,
    padding_side: str | None = None,
) -> torch.Tensor:
    """``[N]`` mean-token NLL ``-(1/J_i) Σ_j log p(y_j | x, y_<j)`` of each continuation."""
    return score_continuations(
        model, tokenizer, prompts, continuations, batch_size=batch_size, padding_side=padding_side
    ).mean_nll


def token_accuracy(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    continuations: list[list[int]],
    *,
    batch_size: int = 32,
    padding_side: str | None = None,
) -> torch.Tensor:
    """``[N]`` teacher-forced top-1 accuracy ``(1/J_i) Σ_j 1[argmax z = y_j]`` of each continuation."""
    return score_continuations(
        model, tokenizer, prompts, continuations, batch_size=batch_size, padding_side=padding_side
    ).accuracy
