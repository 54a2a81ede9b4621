"""A 3D feature space learned from the real set, for Fréchet distance and precision/recall.

No pretrained 3D medical encoder can be downloaded here, so the project trains its own: a small
3D conv encoder that reads a CT volume (normalized HU) and predicts, from the real set's label
maps and reports, the volume fraction of every class and the sex and contrast phase. The
feature vector of a volume is the mean *and standard deviation* of every stage's activations
(``2 * sum(widths)`` numbers): the means carry anatomy and contrast, the standard deviations
texture and noise, so noisy or smeared synthetic CT moves visibly in this space.

The networks trained here are cached on disk (``model.safetensors`` + ``meta.json``) under a
key made of the real set's content hash and the training settings, and reused on the next run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from guidegen.io import write_json_atomic
from guidegen.evaluation.sets import EvalSet, ct_to_unit


# ----------------------------------------------------------------------------- encoder
class SmallEncoder3d(nn.Module):
    """Strided 3D conv stages: (B, C_in, X, Y, Z) → list of (B, w_i, X/2^i, ...) maps."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        stages, c = [], in_channels
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(
                nn.Conv3d(c, w, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(min(4, w), w),
                nn.SiLU(),
                nn.Conv3d(w, w, 3, padding=1),
                nn.SiLU(),
            ))
            c = w
        self.stages = nn.ModuleList(stages)
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    @property
    def feature_dim(self) -> int:
        return 2 * sum(self.widths)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) → (B, 2 * sum(widths)): per-stage channel means and stds."""
        out = []
        for m in self(x):
            flat = m.flatten(2)
            out += [flat.mean(-1), flat.std(-1)]
        return torch.cat(out, dim=1)


class MultiHeadNet(nn.Module):
    """Encoder + linear heads on the pooled features; ``heads`` maps name → output size."""

    def __init__(self, in_channels: int, heads: dict[str, int], widths: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.encoder = SmallEncoder3d(in_channels, widths)
        self.heads = nn.ModuleDict({k: nn.Linear(self.encoder.feature_dim, n) for k, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.encoder.features(x)
        return {k: h(f) for k, h in self.heads.items()}


# ---------------------------------------------------------------------------- training
def fit_multitask(
    net: MultiHeadNet,
    inputs: Callable[[np.ndarray], torch.Tensor],
    targets: dict[str, np.ndarray],
    n: int,
    *,
    steps: int,
    batch_size: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``net`` on ``n`` cases; returns the loss per step.

    ``inputs(idx)`` gives the (B, C, X, Y, Z) batch of case indices ``idx``. ``targets`` maps a
    head name to (N,) int64 class ids (cross-entropy; -1 = unknown, ignored) or (N, K) float
    targets (mean squared error).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    net.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).numpy()
        out = net(inputs(idx))
        loss = torch.zeros(())
        for name, y in targets.items():
            t = torch.as_tensor(y[idx])
            if t.dtype == torch.int64:
                if (t >= 0).any():
                    loss = loss + F.cross_entropy(out[name], t, ignore_index=-1)
            else:
                loss = loss + F.mse_loss(out[name], t.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


# ------------------------------------------------------------------------------ caching
def cached_model(cache_dir: Path | None, name: str, key: dict, build: Callable[[], nn.Module],
                 train: Callable[[nn.Module], dict]) -> tuple[nn.Module, dict]:
    """Build a net and load it from ``cache_dir/name`` when ``key`` matches, else train and save.

    ``train(net)`` returns a dict of training facts stored in ``meta.json`` (losses, seconds);
    the returned meta has ``"cached": True`` when the weights came from disk.
    """
    from safetensors.torch import load_file, save_file

    net = build()
    target = Path(cache_dir) / name if cache_dir is not None else None
    if target is not None and (target / "meta.json").is_file() and (target / "model.safetensors").is_file():
        try:
            meta = json.loads((target / "meta.json").read_text())
            if meta.get("key") == key:
                net.load_state_dict(load_file(str(target / "model.safetensors")))
                net.eval()
                return net, {**meta, "cached": True}
        except Exception:  # a corrupt cache entry is simply retrained
            pass
    t0 = time.perf_counter()
    facts = train(net)
    meta = {"key": key, "seconds": round(time.perf_counter() - t0, 2), **facts}
    if target is not None:
        try:
            target.mkdir(parents=True, exist_ok=True)
            from guidegen.io import atomic_write

            with atomic_write(target / "model.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
            write_json_atomic(target / "meta.json", meta)  # written last: marks the entry complete
        except OSError:
            pass
    net.eval()
    return net, {**meta, "cached": False}


# ------------------------------------------------------------------------ feature net
@dataclass(frozen=True)
class FeatureNetConfig:
    widths: tuple[int, ...] = (8, 16, 32)
    steps: int = 150
    batch_size: int = 2
    lr: float = 2e-3
    seed: int = 0


SEXES = ("male", "female")
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")


def _class_index(values: list, vocab: tuple[str, ...]) -> np.ndarray:
    return np.array([vocab.index(v) if v in vocab else -1 for v in values], dtype=np.int64)


def ct_batch(ds: EvalSet) -> Callable[[np.ndarray], torch.Tensor]:
    """Case indices → (B, 1, X, Y, Z) float32 normalized CT of ``ds``."""
    return lambda idx: torch.from_numpy(ct_to_unit(ds.ct[np.asarray(idx)]))[:, None]


def train_feature_net(real: EvalSet, cfg: FeatureNetConfig, cache_dir: Path | None) -> tuple[MultiHeadNet, dict]:
    """The real-trained CT encoder (cached by real-set hash + ``cfg``)."""
    n_cls = real.label_set.num_classes
    counts = np.stack([np.bincount(lab.ravel(), minlength=n_cls)[:n_cls] for lab in real.labels]).astype(np.float32)
    # sqrt of the volume fraction: small organs still weigh in the regression loss
    frac = np.sqrt(counts / counts.sum(1, keepdims=True))
    targets = {
        "volumes": frac,
        "sex": _class_index([(f or {}).get("sex") for f in real.findings], SEXES),
        "phase": _class_index([(f or {}).get("phase") for f in real.findings], PHASES),
    }
    heads = {"volumes": n_cls, "sex": len(SEXES), "phase": len(PHASES)}
    key = {"kind": "feature_net", "version": 1, "real": real.digest, "grid": list(real.labels.shape[1:]), **_cfg_dict(cfg)}

    def build() -> MultiHeadNet:
        torch.manual_seed(cfg.seed)
        return MultiHeadNet(1, heads, cfg.widths)

    def train(net: MultiHeadNet) -> dict:
        losses = fit_multitask(net, ct_batch(real), targets, len(real), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        return {"final_loss": float(np.mean(losses[-10:])) if losses else None, "steps": cfg.steps}

    return cached_model(cache_dir, "feature_net", key, build, train)


@torch.no_grad()
def extract_features(net: MultiHeadNet, ds: EvalSet, batch_size: int = 4) -> np.ndarray:
    """(N, D) pooled encoder features of every CT in ``ds``."""
    net.eval()
    make = ct_batch(ds)
    out = [net.encoder.features(make(np.arange(i, min(i + batch_size, len(ds))))).numpy() for i in range(0, len(ds), batch_size)]
    return np.concatenate(out).astype(np.float64)


def _cfg_dict(cfg) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
