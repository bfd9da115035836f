"""The C_0 cache cannot be silently wrong: content keys, verified entries, atomic writes."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import warnings

import pytest
import torch

from blueedit.data.corpus import corpus_fingerprint
from blueedit.editing.statistics import LayerStats, StatisticsCache, StatisticsCacheWarning, StatsConfig
from blueedit.models.adapters import ModelAdapter
from blueedit.models.loading import model_content_fingerprints
from helpers import CORPUS, make_model, make_tokenizer

SPEC = StatsConfig(corpus="wikipedia-sample", num_samples=len(CORPUS), max_length=32, batch_size=5)


def _texts():
    return list(CORPUS)


def _collect(root, model, tok, layers=(1, 3), texts=_texts, label="tiny"):
    adapter = ModelAdapter(model)
    return StatisticsCache(root, label).get_or_collect(model, adapter, tok, list(layers), SPEC, "c", texts)


def _no_texts():
    raise AssertionError("the cache should have been used")


def _entries(root):
    return sorted((root / "stats" / "tiny").glob("*.safetensors"))


def test_fingerprint_follows_content_not_path():
    tok = make_tokenizer()
    a, b = make_model("llama", seed=0), make_model("llama", seed=1)
    fa = model_content_fingerprints(a, tok, [1, 3], blocks="model.layers")
    assert fa == model_content_fingerprints(make_model("llama", seed=0), tok, [1, 3], blocks="model.layers")
    assert fa[1] != model_content_fingerprints(b, tok, [1, 3], blocks="model.layers")[1]
    # a change in block 2 changes C_0 of layer 3 but not of layer 1; a deeper block changes neither
    with torch.no_grad():
        a.model.layers[2].mlp.up_proj.weight[0, 0] += 1.0
    f2 = model_content_fingerprints(a, tok, [1, 3], blocks="model.layers")
    assert f2[1] == fa[1] and f2[3] != fa[3]
    with torch.no_grad():
        a.model.layers[5].mlp.up_proj.weight[0, 0] += 1.0
    assert model_content_fingerprints(a, tok, [1, 3], blocks="model.layers") == f2
    # another tokenizer is another model
    assert model_content_fingerprints(make_model("llama", seed=0), make_tokenizer(bos=True), [1, 3],
                                      blocks="model.layers") != fa


def test_stale_cache_for_another_model_is_not_used(tmp_path):
    """A different model under the same name (label) must not reuse the first one's C_0."""
    tok = make_tokenizer()
    first = _collect(tmp_path, make_model("llama", seed=0), tok)
    again = _collect(tmp_path, make_model("llama", seed=0), tok, texts=_no_texts)
    assert torch.equal(again[1].mom2, first[1].mom2)
    calls = []
    other = _collect(tmp_path, make_model("llama", seed=1), tok, texts=lambda: calls.append(1) or _texts())
    assert calls, "a different model reused the cached statistics"
    assert not torch.allclose(other[1].mom2, first[1].mom2)


def test_corpus_file_identity_is_in_the_key(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("some text")
    a = corpus_fingerprint("wikipedia-sample", 10, 200, files=[f])
    g = tmp_path / "copy.txt"
    shutil.copy(f, g)
    assert corpus_fingerprint("wikipedia-sample", 10, 200, files=[g]) == a  # same content, same key
    f.write_text("other text")
    assert corpus_fingerprint("wikipedia-sample", 10, 200, files=[f]) != a


@pytest.mark.parametrize("damage", ["zeros", "truncate", "garbage"])
def test_damaged_cache_entry_is_reported_and_recomputed(tmp_path, damage):
    tok, model = make_tokenizer(), make_model("llama")
    first = _collect(tmp_path, model, tok)
    entry = _entries(tmp_path)[0]
    raw = bytearray(entry.read_bytes())
    if damage == "zeros":  # 4 KB of zeros in the tensor data: only the checksum can tell
        raw[-5000:-904] = bytes(4096)
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(raw))
    calls = []
    with pytest.warns(StatisticsCacheWarning, match=str(entry.name)) as rec:
        res = _collect(tmp_path, model, tok, texts=lambda: calls.append(1) or _texts())
    assert str(entry) in str(rec[0].message)
    assert calls, "the damaged entry was used"
    for l in (1, 3):
        assert torch.equal(res[l].mom2, first[l].mom2)
    with warnings.catch_warnings():  # the recomputed entry replaced the damaged one
        warnings.simplefilter("error")
        _collect(tmp_path, model, tok, texts=_no_texts)


def test_entry_under_another_key_is_rejected(tmp_path):
    tok, model = make_tokenizer(), make_model("llama")
    _collect(tmp_path, model, tok)
    a, b = _entries(tmp_path)
    shutil.copy(a, b)  # one layer's C_0 under the other layer's name
    with pytest.warns(StatisticsCacheWarning, match="holds key"):
        res = _collect(tmp_path, model, tok, texts=_texts)
    assert res[1].mom2.shape == res[3].mom2.shape


def _writer(root, seed, n):
    cache = StatisticsCache(root, "tiny")
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        cache.save("k", LayerStats(torch.randn(512, 512, generator=g), 7), {"writer": seed})


def test_concurrent_writers_never_leave_a_broken_entry(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, s, 20)) for s in (1, 2)]
    for p in procs:
        p.start()
    cache = StatisticsCache(tmp_path, "tiny")
    loads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticsCacheWarning)  # a half-written entry would warn
        while any(p.is_alive() for p in procs):
            if cache.load("k") is not None:
                loads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert cache.load("k").count == 7
    assert not list(cache.dir.glob(".*.tmp"))


def test_a_write_that_dies_halfway_leaves_the_old_entry(tmp_path, monkeypatch):
    import safetensors.torch

    cache = StatisticsCache(tmp_path, "tiny")
    good = LayerStats(torch.eye(64), 3)
    cache.save("k", good, {})
    real = safetensors.torch.save_file

    def dies_halfway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise KeyboardInterrupt  # the process is killed in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        cache.save("k", LayerStats(2 * torch.eye(64), 5), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", StatisticsCacheWarning)
        loaded = cache.load("k")
    assert loaded.count == 3 and torch.equal(loaded.mom2, good.mom2)
    assert not list(cache.dir.glob(".*.tmp"))
