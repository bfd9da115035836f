"""Fluency of generations: weighted n-gram entropy (ROME/MEMIT), top-k sampled and greedy generation.

See ``docs/algorithms.md`` §8 (Evaluation).

For a text with word n-grams ``g`` occurring ``c(g)`` times, ``f(g) = c(g) / Σ c`` and

    H_n = -Σ_g f(g) · log2 f(g)                          (bits)

The per-text score is the arithmetic mean of the weighted entropies over ``n ∈ {2, 3}`` with
weights ``w = (2/3, 4/3)``:

    E(text) = (w_2 · H_2 + w_3 · H_3) / 2

and the fluency of a set of generations is ``100 · mean_texts E(text)`` (published tables print
the ×100 value, e.g. ~620 for an unedited GPT-J). Repetitive, degenerate text has low entropy.

The published generations (:func:`generate_sampled`) are top-``k`` sampled (``k = 5``) until a
row holds ``max_length = 100`` tokens counting the prompt's own tokens: at each step the model's
next-token distribution is restricted to its ``k`` most likely tokens and renormalized,

    p'(t) = p(t) / Σ_{u ∈ top_k} p(u)   for t ∈ top_k,   0 otherwise,

and one token is drawn from ``p'``. Generation does not stop at EOS (special tokens are dropped
when decoding), and the texts are NFKD-normalized with blank lines joined, as published.
Words come from a small regex tokenizer that mimics ``nltk.word_tokenize`` on ordinary prose
(words, numbers with inner ``.``/``,``, contractions split as ``n't``/``'s``, punctuation alone).
"""

from __future__ import annotations

import inspect
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from blueedit.evaluation.scoring import model_device
from blueedit.models.tokens import encode_prompt, pad_batch, pad_token_id

__all__ = [
    "word_tokenize",
    "ngram_entropy",
    "text_ngram_entropy",
    "fluency_score",
    "generate_greedy",
    "generate_sampled",
    "sample_top_k",
]

NGRAM_ORDERS: tuple[int, ...] = (2, 3)
NGRAM_WEIGHTS: tuple[float, ...] = (2.0 / 3.0, 4.0 / 3.0)

_WORD_RE = re.compile(
    r"""
    \d+(?:[.,]\d+)+                # numbers with separators: 3.14, 10,000
    | [A-Za-z]+(?=n't\b)           # "do" of "don't"
    | n't\b                        # "n't"
    | '(?:s|re|ve|ll|d|m)\b        # clitics: 's 're 've 'll 'd 'm
    | \w+(?:-\w+)*                 # words, numbers, hyphenated words
    | \.\.\.                       # ellipsis
    | [^\w\s]                      # any other single symbol
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words and punctuation marks (an approximation of NLTK's tokenizer)."""
    return _WORD_RE.findall(text)


def ngram_entropy(text_or_tokens: str | Sequence[str], n: int) -> float:
    """Entropy in bits ``H_n = -Σ f log2 f`` of the n-gram frequency distribution.

    ``text_or_tokens`` is a text (word-tokenized with :func:`word_tokenize`) or a token list.
    A text with fewer than ``n`` tokens has no n-grams and entropy 0.
    """
    tokens = word_tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(
    text: str | Sequence[str],
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Per-text score ``E = (1/|orders|) Σ_k weights[k] · H_{orders[k]}``.

    With the defaults this is ROME's ``compute_n_gram_entropy``: ``(2/3 · H_2 + 4/3 · H_3) / 2``.
    """
    if len(orders) != len(weights) or not orders:
        raise ValueError("orders and weights must be non-empty and of the same length")
    tokens = word_tokenize(text) if isinstance(text, str) else list(text)
    return sum(w * ngram_entropy(tokens, n) for n, w in zip(orders, weights)) / len(orders)


def fluency_score(texts: Sequence[str]) -> float:
    """Fluency ``100 · mean_texts E(text)`` of generations (``nan`` for no texts)."""
    if not texts:
        return float("nan")
    return 100.0 * sum(text_ngram_entropy(t) for t in texts) / len(texts)


def _is_hf_generator(model: nn.Module) -> bool:
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, GenerationMixin)


@torch.no_grad()
def _greedy_loop(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
) -> torch.Tensor:
    """Greedy decoding without a cache for any ``model(input_ids, attention_mask, position_ids)``.

    ``input_ids``/``attention_mask``: ``[B, T]`` left-padded. Returns the new tokens
    ``[B, T_new]`` with ``T_new <= max_new_tokens`` (``pad_id`` after a row's EOS).
    """
    ids, mask = input_ids, attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
        logits = out.logits[:, -1]  # [B, V]
        nxt = torch.where(done, torch.full_like(ids[:, 0], pad_id), logits.argmax(-1))  # [B]
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # rows already finished see padding
        if eos_id is not None:
            done = done | (nxt == eos_id)
        if bool(done.all()):
            break
    if not new:
        return ids[:, :0]
    return torch.stack(new, dim=1)


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    batch_size: int = 16,
    *,
    include_prompt: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding.

    Hugging Face models use ``model.generate(do_sample=False)``; any other model is decoded with
    a plain loop (no cache). Generation of a row stops at EOS. With ``include_prompt`` (default,
    as in ROME's fluency/consistency texts) each returned text is ``prompt + continuation``.
    """
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        encoded = [encode_prompt(tokenizer, p, None)[0] for p in chunk]
        batch = pad_batch(encoded, [-1] * len(chunk), pad_id=pad_id, padding_side="left").to(device)
        if _is_hf_generator(model):
            generated = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new_ids = generated[:, batch.input_ids.shape[1] :]
        else:
            new_ids = _greedy_loop(
                model, batch.input_ids, batch.attention_mask, max_new_tokens, eos_id, pad_id
            )
        for prompt_ids, row in zip(encoded, new_ids.tolist()):
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            # decode prompt and continuation together so word boundaries come out right
            text = tokenizer.decode(prompt_ids + row, skip_special_tokens=True)
            if not include_prompt:
                head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
                if text.startswith(head):
                    text = text[len(head) :]
                else:
                    text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(text)
    return out


def sample_top_k(logits: torch.Tensor, k: int, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from the renormalized top-``k`` distribution by inverse CDF.

    Args:
        logits: ``[B, V]`` next-token logits.
        k: how many of the most likely tokens stay (``k >= 1``; clipped to ``V``).
        uniform: ``[B]`` numbers in ``[0, 1)``, one per row (the only randomness).

    Returns:
        ``[B]`` token ids: with ``q`` the top-``k`` probabilities in decreasing order, renormalized
        to sum 1, row ``b`` gets the ``j``-th top token for the smallest ``j`` with
        ``q_1 + ... + q_j > uniform[b]``.
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    probs = torch.softmax(logits.float(), dim=-1)  # [B, V]
    top_p, top_i = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)  # [B, k], decreasing
    q = top_p / top_p.sum(-1, keepdim=True)
    cdf = q.cumsum(-1)  # [B, k]
    u = uniform.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1)  # [B, 1]
    j = (cdf <= u).sum(-1).clamp(max=q.shape[-1] - 1)  # [B]
    return top_i.gather(-1, j.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _sampling_loop(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int,
    top_k: int,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """``steps`` top-``k`` sampled tokens for left-padded ``[B, T]`` inputs: ``[B, steps]``.

    Hugging Face models reuse their key/value cache; any other model is re-run on the whole
    sequence at each step. Row ``b`` draws its uniforms from ``generators[b]`` only.
    """
    use_cache = _is_hf_generator(model)
    # transformers 5 names the cache argument and output ``cache``; 4.x ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids, mask = input_ids, attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    step_ids, step_pos = ids, position_ids
    new: list[torch.Tensor] = []
    for _ in range(steps):
        if use_cache:
            kwargs = {cache_arg: past} if past is not None else {}
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **kwargs)
            past = out[cache_arg] if cache_arg in out else out.past_key_values
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # [B]
        nxt = sample_top_k(out.logits[:, -1], top_k, u)  # [B]
        new.append(nxt)
        step_pos = position_ids[:, -1:] + 1
        step_ids = nxt[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = torch.cat([position_ids, step_pos], dim=1)
    if not new:
        return ids[:, :0]
    return torch.stack(new, dim=1)


def _published_text(text: str) -> str:
    """The published clean-up of a generated text: NFKD normalization, blank lines joined."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def generate_sampled(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Top-``k`` sampled texts of ``max_length`` tokens counting the prompt, as published.

    Each returned text is the decoded prompt plus continuation (special tokens dropped,
    NFKD-normalized, blank lines joined). A prompt already ``max_length`` tokens long or longer
    is returned as it is. The draws of prompt ``i`` come from its own ``torch.Generator``
    seeded with ``seed + i``, so the result depends on ``seed`` and the prompts only (not on
    ``batch_size``, up to float rounding of padded batches) and the global random state is
    left untouched.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        encoded = [encode_prompt(tokenizer, p, None)[0] for p in chunk]
        budgets = [max(0, max_length - len(e)) for e in encoded]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        batch = pad_batch(encoded, [-1] * len(chunk), pad_id=pad_id, padding_side="left").to(device)
        new_ids = _sampling_loop(model, batch.input_ids, batch.attention_mask, max(budgets), top_k, generators)
        for prompt_ids, row, budget in zip(encoded, new_ids.tolist(), budgets):
            text = tokenizer.decode(prompt_ids + row[:budget], skip_special_tokens=True)
            out.append(_published_text(text))
    return out
