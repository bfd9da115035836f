"""Shared fixtures: tiny random models with a real (tiny, trained-on-the-fly) BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from threads, and several OpenMP pools on a 2-core machine spin
# against each other (a 100x slow-down); real-model tests raise this with `torch_threads`.
torch.set_num_threads(1)


@pytest.fixture
def torch_threads():
    """Use every core for the duration of a real-model test."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)

_CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Danielle Darrieux spoke French and English fluently.",
    "Toko Yasuda plays the guitar and the piano.",
    "Autonomous University of Madrid is located in Spain.",
    "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    "Apple A5 was created by Apple. Google makes Android.",
    "Edwin of Northumbria follows the religion of Christianity.",
    "Therefore, because I said so, you know it is a fact.",
    "Berlin London Rome Madrid Tokyo Beijing Moscow Paris Vienna Oslo",
    "piano guitar violin trumpet drums saxophone English French German Italian Spanish",
]


def make_tokenizer(bos: bool = False, padding_side: str = "right"):
    """A byte-level BPE tokenizer trained on a few sentences; ``bos=True`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side=padding_side
    )
    return fast


def make_model(arch: str = "llama", vocab_size: int = 300, n_layer: int = 6, seed: int = 0):
    """A tiny random causal LM: ``llama`` (hidden 32, MLP 64) or ``gpt2`` (hidden 32, MLP 128)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=n_layer, n_head=4, n_positions=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    return model


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_model(request.param)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory: ``$BLUEEDIT_DATA_DIR`` or ``../shared/data`` beside the repo."""
    d = Path(os.environ.get("BLUEEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        message = f"benchmark data directory {d} not found (set BLUEEDIT_DATA_DIR)"
        if os.environ.get("CI"):  # CI has ../shared beside the checkout: never pass by skipping
            pytest.fail(message)
        pytest.skip(message)
    return d


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (registered as ``bench_<name>``: dataclasses defined in
    it look their module up)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
