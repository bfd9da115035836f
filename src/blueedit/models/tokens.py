"""Tokenization for editing and scoring: fact-token positions and target masks under any padding.

Every text is tokenized on its own (with the tokenizer's own special tokens, so a BOS is kept
when the tokenizer adds one); the batch is then padded here, on the side asked for, so the
position of every token in the padded batch is known exactly. Position ids are built from the
attention mask, so a left-padded and a right-padded batch give the same hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """A padded batch of prompts, each optionally followed by continuation tokens.

    Shapes (``B`` sequences, ``T`` padded length, ``J`` longest continuation):
        input_ids, attention_mask, position_ids: ``[B, T]``
        fact_index: ``[B]`` position of the fact token (last subject token), ``-1`` when none
        last_prompt_index: ``[B]`` position of the prompt's last token
        target_ids: ``[B, J]`` continuation token ids (0 where padded)
        target_mask: ``[B, J]`` 1 for real continuation tokens
        target_index: ``[B, J]`` position whose logits predict each continuation token
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    fact_index: torch.Tensor
    last_prompt_index: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_index: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def select(self, rows: torch.Tensor) -> PromptBatch:
        """The sub-batch of ``rows`` (same padded length)."""
        return PromptBatch(**{k: v[rows] for k, v in self.__dict__.items()})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def tokenize_target(tokenizer, target: str) -> list[int]:
    """Token ids of a target object as it follows a prompt: with a leading space, no BOS/EOS.

    Raises ``ValueError`` when the target tokenizes to nothing.
    """
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} has no tokens")
    return list(ids)


def _token_at_char(tokenizer, text: str, char_index: int) -> tuple[list[int], int]:
    """Tokenize ``text`` (with special tokens) and find the token covering ``char_index``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        best = None
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:  # special tokens have empty spans
                continue
            if start <= char_index < end:
                return ids, t
            if start <= char_index:
                best = t
        if best is not None:
            return ids, best
    # slow tokenizers: count the tokens of the text up to and including that character
    ids = list(tokenizer(text)["input_ids"])
    head = list(tokenizer(text[: char_index + 1])["input_ids"])
    eos = tokenizer.eos_token_id
    while head and eos is not None and head[-1] == eos and (not ids or ids[-1] != eos):
        head = head[:-1]
    return ids, len(head) - 1


def encode_prompt(tokenizer, template: str, subject: str | None) -> tuple[list[int], int]:
    """Token ids of ``template`` with ``subject`` filled into its ``{}``, and the fact-token index.

    The fact token is the last token of the subject inside the filled prompt ("subject_last").
    Trailing EOS tokens that a tokenizer appends are dropped so continuations can follow.
    With ``subject=None`` the template is used as it is and the index is ``-1``.
    """
    if subject is None:
        ids = list(tokenizer(template)["input_ids"])
        fact = -1
    else:
        if "{}" not in template:
            raise ValueError(f"prompt {template!r} has no '{{}}' slot for the subject")
        start = template.index("{}")
        text = template[:start] + subject + template[start + 2 :]
        ids, fact = _token_at_char(tokenizer, text, start + len(subject) - 1)
    eos = tokenizer.eos_token_id
    if eos is not None and eos != tokenizer.bos_token_id:
        while len(ids) > 1 and ids[-1] == eos:
            ids = ids[:-1]
    return ids, fact


def anchor_token(tokenizer) -> int:
    """The token put in front of a prompt whose fact token would be position 0: the tokenizer's
    BOS token, else its EOS token (the document separator of models trained without BOS)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to anchor a position-0 fact token")


def encode_fact_prompt(tokenizer, template: str, subject: str, anchor: bool = False) -> tuple[list[int], int]:
    """:func:`encode_prompt` for editing: with ``anchor``, a prompt whose fact token is position 0
    gets :func:`anchor_token` in front (fact token at 1); every other prompt is returned as is."""
    ids, fact = encode_prompt(tokenizer, template, subject)
    if anchor and fact == 0:
        return [anchor_token(tokenizer)] + ids, 1
    return ids, fact


def pad_batch(
    prompts: list[list[int]],
    fact_index: list[int],
    continuations: list[list[int]] | None = None,
    *,
    pad_id: int,
    padding_side: str = "right",
) -> PromptBatch:
    """Concatenate prompt and continuation ids per row and pad the batch on ``padding_side``.

    ``continuations[i]`` tokens are appended to ``prompts[i]``; their predicting positions are
    reported in ``target_index`` (the token at position ``p`` is predicted by the logits at ``p-1``).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n = len(prompts)
    conts = continuations if continuations is not None else [[] for _ in range(n)]
    rows = [list(p) + list(c) for p, c in zip(prompts, conts)]
    T = max(len(r) for r in rows)
    J = max([len(c) for c in conts] + [1])
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attention = torch.zeros((n, T), dtype=torch.long)
    target_ids = torch.zeros((n, J), dtype=torch.long)
    target_mask = torch.zeros((n, J), dtype=torch.long)
    target_index = torch.zeros((n, J), dtype=torch.long)
    fact = torch.full((n,), -1, dtype=torch.long)
    last = torch.zeros((n,), dtype=torch.long)
    for i, (row, p, c) in enumerate(zip(rows, prompts, conts)):
        off = T - len(row) if padding_side == "left" else 0
        input_ids[i, off : off + len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, off : off + len(row)] = 1
        if fact_index[i] >= 0:
            fact[i] = off + fact_index[i]
        last[i] = off + len(p) - 1
        if c:
            target_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            target_mask[i, : len(c)] = 1
            target_index[i, : len(c)] = off + len(p) - 1 + torch.arange(len(c))
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(input_ids, attention, position_ids, fact, last, target_ids, target_mask, target_index)


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0 (masked out anyway)."""
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


def encode_batch(
    tokenizer,
    templates: list[str],
    subjects: list[str | None],
    continuations: list[list[int]] | None = None,
    padding_side: str | None = None,
) -> PromptBatch:
    """Tokenize prompts (subject filled in), append continuations, and pad.

    ``padding_side`` defaults to the tokenizer's own.
    """
    encoded = [encode_prompt(tokenizer, t, s) for t, s in zip(templates, subjects)]
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    return pad_batch(
        [e[0] for e in encoded],
        [e[1] for e in encoded],
        continuations,
        pad_id=pad_token_id(tokenizer),
        padding_side=side,
    )


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, ...], :]`` for ``x: [B, T, D]`` and ``index: [B]`` or ``[B, J]``."""
    if index.dim() == 1:
        return x[torch.arange(x.shape[0], device=x.device), index]
    b = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(index)
    return x[b, index]
