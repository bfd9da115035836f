"""Test doubles with known answers: a fixed-logit bigram causal LM and a word-level tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def word_level_tokenizer(words: list[str], eos: str = "</s>", pad: str = "<pad>"):
    """A whitespace word-level tokenizer over ``words`` (no BOS), so every token is a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)


class BigramLM(nn.Module):
    """A causal LM with fixed logits ``logits[b, t] = table[input_ids[b, t]]`` (``table: [V, V]``).

    It checks that ``attention_mask`` and ``position_ids`` are passed and counts its calls.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone().float(), requires_grad=False)
        self.calls = 0

    @classmethod
    def from_words(cls, words: list[str], entries: dict[str, dict[str, float]]) -> BigramLM:
        """Table with ``table[prev, next] = entries[prev][next]`` and 0 elsewhere."""
        table = torch.zeros(len(words), len(words))
        for prev, row in entries.items():
            for nxt, z in row.items():
                table[words.index(prev), words.index(nxt)] = z
        return cls(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        assert attention_mask is not None and position_ids is not None
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])
