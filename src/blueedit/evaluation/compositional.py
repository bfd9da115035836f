"""Compositional editing metrics on greedy generations (docs/algorithms.md, "A³E").

Every generation is greedy, at most 40 new tokens, cut at its first newline. An answer is
*present* when its normalized form (:func:`normalize`) is a substring of the normalized
generation, on word boundaries. Per composition:

    SR-S = 1[every answer present]             (ordered compositions: present and in order)
    SR-1 = 1[at least one answer present]
    GSR  = SR-S on the rephrased queries (their mean)
    LSR  = mean over unrelated prompts of Rouge-L F1(post-edit generation, pre-edit generation)
    Rouge-L F1 = 2 P R / (P + R),  P = LCS / |candidate|,  R = LCS / |reference|  (word tokens)

Failure counters (proxies; the paper's definitions were not available):

- *loss*: answers present when their edit's own prompt is asked alone, missing in the composed answer;
- *preceding*: an ordered composition with a later answer before an earlier one, or an answer that
  appears in an unrelated prompt's generation after editing and not before;
- *sinking*: answers whose first token ranks 2–10 at the first generated position of the query
  but that are not generated.

:func:`bootstrap_ci` gives percentile 95 % intervals over compositions.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, NFKC, punctuation to spaces, runs of white space to one space, stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def answer_position(generation: str, answer: str) -> int:
    """Where the normalized ``answer`` starts in the normalized ``generation`` (whole words), or -1."""
    g, a = f" {normalize(generation)} ", f" {normalize(answer)} "
    if not a.strip():
        return -1
    return g.find(a)


def all_present(generation: str, answers: Sequence[str], ordered: bool = False) -> bool:
    """SR-S of one generation: every answer present, and in the given order when ``ordered``."""
    pos = [answer_position(generation, a) for a in answers]
    if any(p < 0 for p in pos):
        return False
    return not ordered or all(a < b for a, b in zip(pos, pos[1:]))


def any_present(generation: str, answers: Sequence[str]) -> bool:
    return any(answer_position(generation, a) >= 0 for a in answers)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """Rouge-L F1 on normalized word tokens; 1.0 when both are empty."""
    c, r = normalize(candidate).split(), normalize(reference).split()
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, q = lcs / len(c), lcs / len(r)
    return 2 * p * q / (p + q)


@dataclass
class CompositionOutputs:
    """The generations one composition needs, from one edited model (and the unedited one)."""

    query: str
    rephrased: list[str]
    unrelated_post: list[str]
    unrelated_pre: list[str]
    alone: list[str]  # the generation for each edit's own prompt, its edit alone applied
    first_ranks: list[int]  # rank (1 = top) of each answer's first token at the query's first step


def score(answers: Sequence[str], ordered: bool, out: CompositionOutputs) -> dict[str, float]:
    """SR-S, SR-1, GSR, LSR and the three failure counts for one composition."""
    composed = [answer_position(out.query, a) >= 0 for a in answers]
    loss = sum(1 for a, c, alone in zip(answers, composed, out.alone) if not c and answer_position(alone, a) >= 0)
    leaked = sum(1 for post, pre in zip(out.unrelated_post, out.unrelated_pre)
                 for a in answers if answer_position(post, a) >= 0 and answer_position(pre, a) < 0)
    misordered = int(ordered and all(composed) and not all_present(out.query, answers, True))
    sinking = sum(1 for a, c, r in zip(answers, composed, out.first_ranks) if not c and 2 <= r <= 10)
    gsr = [float(all_present(q, answers, ordered)) for q in out.rephrased]
    lsr = [rouge_l(post, pre) for post, pre in zip(out.unrelated_post, out.unrelated_pre)]
    return {"sr_s": float(all_present(out.query, answers, ordered)), "sr_1": float(any(composed)),
            "gsr": sum(gsr) / len(gsr) if gsr else float("nan"), "lsr": sum(lsr) / len(lsr) if lsr else float("nan"),
            "loss": float(loss), "preceding": float(misordered + leaked), "sinking": float(sinking)}


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and the percentile bootstrap interval (NaNs dropped)."""
    v = [x for x in values if x == x]
    if not v:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(v, k=len(v))) / len(v) for _ in range(n_resamples))
    lo = means[int((1 - level) / 2 * n_resamples)]
    hi = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return sum(v) / len(v), lo, hi


def summarize(rows: list[dict[str, float]], seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric: mean and 95 % interval over compositions (rates in %); counters: totals."""
    out: dict[str, dict[str, float]] = {}
    for key in ("sr_s", "sr_1", "gsr", "lsr"):
        m, lo, hi = bootstrap_ci([r[key] for r in rows], seed=seed)
        out[key] = {"mean": 100 * m, "low": 100 * lo, "high": 100 * hi}
    for key in ("loss", "preceding", "sinking"):
        out[key] = {"total": sum(r[key] for r in rows)}
    out["n"] = {"compositions": len(rows)}
    return out


# -- generation ------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 40, stop: str | None = "\n",
                    after_prompt: Callable[[], None] | None = None,
                    first_logits: list | None = None) -> str:
    """Greedy continuation of ``prompt`` with the key/value cache, cut at ``stop`` (the stopping
    rule) or EOS or ``max_new_tokens``. ``after_prompt`` runs once the prompt has been processed
    (before the first decoding step); the first step's logits ``[V]`` are appended to
    ``first_logits`` when given."""
    from blueedit.editing.targets import cache_argument

    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    cache_arg = cache_argument(model)
    cache, step_ids, pos = {}, ids, torch.arange(ids.shape[1], device=device)[None]
    out: list[int] = []
    for step in range(max_new_tokens):
        mask = torch.ones(1, int(pos[0, -1]) + 1, dtype=torch.long, device=device)
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        if step == 0:
            if after_prompt is not None:
                after_prompt()
            if first_logits is not None:
                first_logits.append(res.logits[0, -1].float().cpu())
        cache = {cache_arg: res[cache_arg] if cache_arg in res else res.past_key_values}
        nxt = int(res.logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if stop and stop in text:
            return text[:text.index(stop)]
        step_ids = torch.tensor([[nxt]], device=device)
        pos = pos[:, -1:] + 1
    return tokenizer.decode(out, skip_special_tokens=True)


def first_token_ranks(logits: torch.Tensor, tokenizer, answers: Sequence[str]) -> list[int]:
    """Rank (1 = highest logit) of each answer's first token (with a leading space) in ``logits``."""
    from blueedit.models.tokens import tokenize_target

    ranks = []
    for a in answers:
        t = tokenize_target(tokenizer, a)[0]
        ranks.append(int((logits > logits[t]).sum()) + 1)
    return ranks
