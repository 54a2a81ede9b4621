"""Knowledge injection: text tokens + findings vector → context tokens for cross-attention.

Paper (GuideGen, TCSS "knowledge-augmented"): learnable task queries attend to the text
encoder's outputs inside transformer-decoder blocks; the responses condition the diffusion
UNets through cross-attention. Here:

    text tokens (B, L, D_text) ──Linear+LN──┐
    findings vector (B, F) ──MLP──> (B, Ff, C)  ├─ memory (B, L+Ff, C) (+ type embedding)
                                            ┘
    queries (Q, C) ──[self-attn → cross-attn(memory) → MLP] × layers──LN──> context (B, Q, C)

so the UNets always see a fixed-size context ``(B, Q, context_dim)`` whatever the encoder
width or prompt length. The findings vector enters as ``Ff`` extra memory tokens: the
structured fields are available even when the encoder blurs them (numbers, laterality).

**Layer-wise responses** (``num_levels`` > 0, ``text.layerwise_injection``): the paper derives,
from the task response R_task above, one response R_layer per UNet level, "some attending to
global anatomy, others to local structures". Here each level ``l`` has its own learnable query
offsets added to R_task; one shared transformer-decoder block lets those queries attend over the
same memory again, giving ``(B, L, Q, C)``; level ``l``'s cross-attention reads ``[:, l]``
(``guidegen.models.unet_checkpoint``). The offsets start at zero, so at initialisation every level
reads R_task refined once more; training lets the levels diverge.

Classifier-free guidance: a learned null context ``(Q, C)`` replaces the context of rows where
``drop`` is True (training drops with probability ``cond_drop_prob``; sampling evaluates the
conditional and the null context and extrapolates).

**Which text is encoded** (:func:`text_for_encoding`, ``TextConfig.encode_text``): by default
the canonical prompt rendered from the parsed findings, followed by the raw report as a second
segment (``"<canonical> Report: <raw>"``). The canonical part comes first so truncation to
``max_tokens`` only ever cuts the raw part; it removes phrasing variance (order, synonyms,
omissions) so equal findings give nearly equal tokens, which matters with few training cases.
The raw part keeps what the parser does not model (morphology words, "spiculated",
"exophytic"), so nothing the user wrote is thrown away.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from guidegen.text.findings import Findings, parse_findings
from guidegen.text.prompts import FINDINGS_DIM, canonical_prompt, findings_vector

RAW_SEGMENT_PREFIX = "Report:"


def sample_drop_mask(batch: int, p: float, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu") -> Tensor:
    """``(batch,)`` bool, each True with probability ``p`` (rows whose condition is dropped)."""
    if p <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    return (u < p).to(device)


class KnowledgeInjection(nn.Module):
    """Learnable queries over text tokens and findings tokens → ``(B, Q, context_dim)``.

    Args:
        text_dim: encoder token width ``D_text`` (384 for MiniLM).
        findings_dim: length ``F`` of the findings vector (:data:`FINDINGS_DIM`).
        context_dim: width ``C`` of the output context tokens.
        num_queries: ``Q``.
        num_layers: transformer-decoder blocks.
        num_heads: attention heads (``context_dim`` must be divisible by it).
        findings_tokens: ``Ff``, memory tokens the findings vector is projected to.
        num_levels: 0 → context ``(B, Q, C)`` for every UNet level; L > 0 → layer-wise context
            ``(B, L, Q, C)``, one response per UNet level.
    """

    def __init__(self, text_dim: int, findings_dim: int = FINDINGS_DIM, context_dim: int = 128,
                 num_queries: int = 16, num_layers: int = 2, num_heads: int = 4, findings_tokens: int = 4,
                 dropout: float = 0.0, num_levels: int = 0) -> None:
        super().__init__()
        while context_dim % num_heads:
            num_heads -= 1
        self.context_dim, self.num_queries, self.findings_tokens = context_dim, num_queries, findings_tokens
        self.text_proj = nn.Sequential(nn.Linear(text_dim, context_dim), nn.LayerNorm(context_dim))
        self.findings_proj = nn.Sequential(nn.Linear(findings_dim, context_dim), nn.SiLU(),
                                           nn.Linear(context_dim, findings_tokens * context_dim))
        self.type_embed = nn.Parameter(torch.zeros(2, context_dim))  # 0: text token, 1: findings token
        self.queries = nn.Parameter(torch.randn(num_queries, context_dim) * 0.02)
        layer = nn.TransformerDecoderLayer(context_dim, num_heads, dim_feedforward=4 * context_dim, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerDecoder(layer, num_layers)
        self.out_norm = nn.LayerNorm(context_dim)
        self.num_levels = num_levels
        if num_levels > 0:
            self.level_queries = nn.Parameter(torch.zeros(num_levels, num_queries, context_dim))
            level_layer = nn.TransformerDecoderLayer(context_dim, num_heads, dim_feedforward=4 * context_dim,
                                                     dropout=dropout, batch_first=True, norm_first=True,
                                                     activation="gelu")
            self.level_block = nn.TransformerDecoder(level_layer, 1)
            self.level_norm = nn.LayerNorm(context_dim)
        null_shape = (num_levels, num_queries, context_dim) if num_levels > 0 else (num_queries, context_dim)
        self.null = nn.Parameter(torch.randn(*null_shape) * 0.02)  # learned null context

    @classmethod
    def from_config(cls, text_cfg, text_dim: int, unet_levels: int) -> "KnowledgeInjection":
        """Sized from the ``text`` config section for a UNet with ``unet_levels`` levels
        (used only when ``text_cfg.layerwise_injection`` is on)."""
        return cls(text_dim=text_dim, context_dim=text_cfg.context_dim, num_queries=text_cfg.num_queries,
                   num_layers=text_cfg.injection_layers,
                   num_levels=unet_levels if text_cfg.layerwise_injection else 0)

    def null_context(self, batch_size: int) -> Tensor:
        """``(B, Q, C)`` (or layer-wise ``(B, L, Q, C)``) null condition for classifier-free guidance."""
        return self.null[None].expand(batch_size, *self.null.shape)

    def forward(self, tokens: Tensor, mask: Tensor, findings_vec: Tensor, drop: Tensor | None = None) -> Tensor:
        """tokens ``(B, L, D_text)``, mask ``(B, L)`` bool (True = real), findings_vec ``(B, F)``,
        drop ``(B,)`` bool or None → context ``(B, Q, C)``, or ``(B, L, Q, C)`` when layer-wise."""
        b = tokens.shape[0]
        text = self.text_proj(tokens.float()) + self.type_embed[0]
        fnd = self.findings_proj(findings_vec.float()).view(b, self.findings_tokens, self.context_dim) + self.type_embed[1]
        memory = torch.cat([text, fnd], dim=1)
        # findings tokens are always valid, so no row is fully masked even for an empty text
        key_pad = torch.cat([~mask.bool(), torch.zeros(b, self.findings_tokens, dtype=torch.bool, device=mask.device)], 1)
        q = self.queries[None].expand(b, -1, -1)
        ctx = self.out_norm(self.blocks(q, memory, memory_key_padding_mask=key_pad))
        if self.num_levels > 0:
            ctx = self.layer_responses(ctx, memory, key_pad)
        if drop is not None:
            dropped = drop.to(ctx.device).view(b, *([1] * (ctx.dim() - 1)))
            ctx = torch.where(dropped, self.null_context(b).to(ctx.dtype), ctx)
        return ctx

    def layer_responses(self, task: Tensor, memory: Tensor, key_pad: Tensor) -> Tensor:
        """R_task ``(B, Q, C)`` → per-level responses ``(B, L, Q, C)`` (levels batched together)."""
        b, q, c = task.shape
        levels = self.num_levels
        queries = (task[:, None] + self.level_queries[None]).reshape(b * levels, q, c)
        out = self.level_block(queries, memory.repeat_interleave(levels, 0),
                               memory_key_padding_mask=key_pad.repeat_interleave(levels, 0))
        return self.level_norm(out).view(b, levels, q, c)


def text_for_encoding(raw: str, findings: Findings | None = None, mode: str = "both") -> str:
    """The string the encoder reads: ``canonical``, ``raw``, or ``both`` (canonical, then raw)."""
    if mode == "raw":
        return raw
    canonical = canonical_prompt(findings if findings is not None else parse_findings(raw))
    if mode == "canonical":
        return canonical
    return f"{canonical} {RAW_SEGMENT_PREFIX} {raw.strip()}"


class TextConditioner:
    """Text → the tensors :class:`KnowledgeInjection` takes (parse, augment, encode, vectorise).

    ``prepare(texts)`` → ``{"tokens": (B, L, D) float32, "mask": (B, L) bool,
    "findings_vec": (B, FINDINGS_DIM) float32}``. The encoder is built from the config unless
    given; a frozen encoder's outputs are cached on disk under ``cache_dir`` when given, so
    training datasets can precompute them once.
    """

    def __init__(self, cfg, cache_dir: str | os.PathLike | None = None, encoder=None,
                 device: str | torch.device = "cpu") -> None:
        from guidegen.text.encoders import EmbeddingCache, build_text_encoder

        self.cfg = cfg
        self.encoder = encoder if encoder is not None else build_text_encoder(cfg, device=device)
        self.mode = getattr(cfg, "encode_text", "both")
        self.cache = (EmbeddingCache(Path(cache_dir), self.encoder.encoder_id)
                      if cache_dir is not None and self.encoder.frozen else None)

    @property
    def text_dim(self) -> int:
        return self.encoder.dim

    def encoding_texts(self, texts: list[str], findings: list[Findings] | None = None) -> list[str]:
        findings = findings if findings is not None else [parse_findings(t) for t in texts]
        return [text_for_encoding(t, f, self.mode) for t, f in zip(texts, findings)]

    def prepare(self, texts: list[str], findings: list[Findings] | None = None) -> dict[str, Tensor]:
        """Tensors for a batch of reports; ``findings`` (already parsed/known) skips parsing."""
        findings = findings if findings is not None else [parse_findings(t) for t in texts]
        enc_texts = self.encoding_texts(texts, findings)
        if self.cache is not None:
            tokens, mask = self.cache.encode(self.encoder, enc_texts)
        else:
            tokens, mask = self.encoder.encode(enc_texts)
        vec = torch.from_numpy(np.stack([findings_vector(f) for f in findings])) if findings else \
            torch.zeros(0, FINDINGS_DIM)
        return {"tokens": tokens, "mask": mask, "findings_vec": vec.to(tokens.device)}

    def build_injection(self, unet_levels: int = 0) -> KnowledgeInjection:
        """A :class:`KnowledgeInjection` sized for this encoder and the config (and a UNet with
        ``unet_levels`` levels when the config asks for layer-wise responses)."""
        return KnowledgeInjection.from_config(self.cfg, self.encoder.dim, unet_levels)
