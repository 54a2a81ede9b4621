"""Knowledge injection, the classifier-free-guidance null condition, and TextConditioner."""

from __future__ import annotations

import pytest
import torch

from guidegen.config import TextConfig
from guidegen.text.encoders import TrainableTokenEncoder
from guidegen.text.findings import parse_findings
from guidegen.text.knowledge import KnowledgeInjection, TextConditioner, sample_drop_mask, text_for_encoding
from guidegen.text.prompts import FINDINGS_DIM, canonical_prompt


def _inputs(b=3, l=10, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, l, d, generator=g)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :] = False  # an empty text: the findings tokens still give the queries something to read
    return tokens, mask, torch.rand(b, FINDINGS_DIM, generator=g)


def test_injection_shapes_and_padding_is_ignored():
    torch.manual_seed(0)
    ki = KnowledgeInjection(text_dim=24, context_dim=32, num_queries=5, num_layers=2, num_heads=4)
    tokens, mask, vec = _inputs()
    ctx = ki(tokens, mask, vec)
    assert ctx.shape == (3, 5, 32) and torch.isfinite(ctx).all()
    changed = tokens.clone()
    changed[1, 4:] = 100.0  # padded positions: must not matter
    assert torch.allclose(ki(changed, mask, vec)[1], ctx[1], atol=1e-5)
    changed[1, 0] += 1.0  # a real token: must matter
    assert not torch.allclose(ki(changed, mask, vec)[1], ctx[1], atol=1e-5)
    vec2 = vec.clone()
    vec2[2, 0] += 1.0  # the findings vector matters
    assert not torch.allclose(ki(tokens, mask, vec2)[2], ctx[2], atol=1e-5)


def test_null_condition_and_gradients():
    torch.manual_seed(0)
    ki = KnowledgeInjection(text_dim=24, context_dim=32, num_queries=5, num_layers=1)
    tokens, mask, vec = _inputs()
    drop = torch.tensor([True, False, True])
    ctx = ki(tokens, mask, vec, drop)
    null = ki.null_context(3)
    assert null.shape == (3, 5, 32)
    assert torch.equal(ctx[0], null[0]) and torch.equal(ctx[2], null[2])
    assert not torch.allclose(ctx[1], null[1])
    assert torch.equal(ctx[1], ki(tokens, mask, vec)[1])
    ctx.pow(2).sum().backward()
    assert ki.queries.grad is not None and ki.queries.grad.abs().sum() > 0
    assert ki.null.grad is not None and ki.null.grad.abs().sum() > 0
    assert ki.text_proj[0].weight.grad.abs().sum() > 0


def test_sample_drop_mask_rate_and_determinism():
    g = torch.Generator().manual_seed(0)
    m = sample_drop_mask(20000, 0.1, g)
    assert m.dtype == torch.bool and m.shape == (20000,) and 0.09 < m.float().mean() < 0.11
    assert torch.equal(m, sample_drop_mask(20000, 0.1, torch.Generator().manual_seed(0)))
    assert not sample_drop_mask(5, 0.0).any() and sample_drop_mask(5, 1.0).all()


def test_text_for_encoding_modes():
    raw = "62-year-old man, 4 cm mass in the left kidney"
    canonical = canonical_prompt(parse_findings(raw))
    assert text_for_encoding(raw, mode="raw") == raw
    assert text_for_encoding(raw, mode="canonical") == canonical
    both = text_for_encoding(raw)
    assert both.startswith(canonical) and both.endswith(raw)


def test_conditioner_prepare_with_trainable_encoder():
    cfg = TextConfig(encoder="trainable", max_tokens=24, trainable_dim=32, context_dim=16, num_queries=4)
    cond = TextConditioner(cfg)
    texts = ["F64, two liver lesions, T3N1M0", "no tumour", ""]
    out = cond.prepare(texts)
    assert set(out) == {"tokens", "mask", "findings_vec"}
    assert out["tokens"].shape == (3, 24, 32) and out["mask"].shape == (3, 24) and out["findings_vec"].shape == (3, FINDINGS_DIM)
    assert cond.cache is None  # trainable encoders are never cached
    ki = cond.build_injection()
    ctx = ki(**out, drop=sample_drop_mask(3, cfg.cond_drop_prob, torch.Generator().manual_seed(1)))
    assert ctx.shape == (3, 4, 16)


def test_layerwise_injection_shapes_null_drop_and_level_independence():
    cfg = TextConfig(encoder="trainable", max_tokens=24, trainable_dim=32, context_dim=16, num_queries=4,
                     layerwise_injection=True)
    cond = TextConditioner(cfg)
    out = cond.prepare(["F64, two liver lesions, T3N1M0", "no tumour"])
    torch.manual_seed(0)
    ki = cond.build_injection(unet_levels=3)
    assert ki.null_context(2).shape == (2, 3, 4, 16)
    ctx = ki(**out)
    assert ctx.shape == (2, 3, 4, 16)
    # zero-initialised level offsets: every level starts as the same refinement of R_task
    torch.testing.assert_close(ctx[:, 0], ctx[:, 2])
    with torch.no_grad():
        ki.level_queries[1].normal_()
    ctx = ki(**out)
    assert (ctx[:, 1] - ctx[:, 0]).abs().max() > 1e-3 and torch.allclose(ctx[:, 0], ctx[:, 2])
    dropped = ki(**out, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], ki.null[None].expand(1, -1, -1, -1)[0]) and torch.equal(dropped[1], ctx[1])
    # off: the plain (B, Q, C) context; the option only exists when asked for
    assert cond.build_injection().num_levels == 0 and ki.num_levels == 3
    assert TextConditioner(cfg.model_copy(update={"layerwise_injection": False})).build_injection(3).num_levels == 0


@pytest.mark.parametrize("mode", ["both", "canonical"])
def test_conditioner_cache_with_minilm(tmp_path, mode):
    cfg = TextConfig(encoder="minilm", max_tokens=48, encode_text=mode)
    cond = TextConditioner(cfg, cache_dir=tmp_path)
    texts = ["62-year-old man, 4 cm mass in the left kidney", "man aged 62 with a left renal mass of 40 mm"]
    a = cond.prepare(texts)
    # in canonical mode both reports become the same text: encoded once
    assert a["tokens"].shape == (2, 48, 384) and cond.cache.misses == (1 if mode == "canonical" else 2)
    b = cond.prepare(texts)
    assert cond.cache.hits == 2 and torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["findings_vec"][0], a["findings_vec"][1])  # same findings, different words
    if mode == "canonical":  # the canonical prompt removes the phrasing difference entirely
        assert torch.equal(a["tokens"][0], a["tokens"][1])
    else:
        assert not torch.equal(a["tokens"][0], a["tokens"][1])
