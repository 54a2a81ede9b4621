"""A small MONAI 3D UNet for multi-organ segmentation of CT, used by evaluation.

Two uses (DESIGN §8): trained on real pairs and run on synthetic CT (alignment: does the CT show
the anatomy its label map says?), and trained on N synthetic vs N real pairs and tested on
held-out real cases (usefulness). Input (B, 1, X, Y, Z) CT normalized to [-1, 1]; output
(B, C, X, Y, Z) class logits. The recipe (Dice + cross-entropy, AdamW, cosine decay) is
deliberately plain so that differences come from the training data, not the tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from tqdm import tqdm


@dataclass(frozen=True)
class SegmenterConfig:
    channels: tuple[int, ...] = (8, 16, 32)
    num_res_units: int = 1
    steps: int = 200
    batch_size: int = 2
    lr: float = 3e-3
    seed: int = 0


def build_segmenter(num_classes: int, cfg: SegmenterConfig = SegmenterConfig()) -> nn.Module:
    """MONAI ``UNet``: 1 CT channel in, ``num_classes`` logits out, stride 2 between levels."""
    torch.manual_seed(cfg.seed)
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes,
        channels=tuple(cfg.channels),
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.num_res_units,
        norm="instance",
    )


def train_segmenter(net: nn.Module, ct: np.ndarray, labels: np.ndarray, cfg: SegmenterConfig, progress: str | None = None) -> list[float]:
    """Fit ``net`` on ``ct`` (N, X, Y, Z) in [-1, 1] and ``labels`` (N, X, Y, Z) ids; returns losses.

    Grid sizes must be divisible by ``2 ** (len(channels) - 1)``. ``progress``: a tqdm bar with
    this description (minutes of training on a CPU), or None for none.
    """
    n = len(ct)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    x_all = torch.from_numpy(np.ascontiguousarray(ct, dtype=np.float32))[:, None]
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))[:, None]
    net.train()
    losses = []
    for _ in tqdm(range(cfg.steps), desc=progress, unit="step", disable=progress is None):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        loss = loss_fn(net(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


@torch.no_grad()
def segment(net: nn.Module, ct: np.ndarray, batch_size: int = 2) -> np.ndarray:
    """Predicted label ids (N, X, Y, Z) uint8 for normalized CT (N, X, Y, Z) in [-1, 1]."""
    net.eval()
    out = []
    for i in range(0, len(ct), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(ct[i:i + batch_size], dtype=np.float32))[:, None]
        out.append(net(x).argmax(1).to(torch.uint8).numpy())
    return np.concatenate(out)
