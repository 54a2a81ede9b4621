"""Tiny checkpoints of the three stages, trained here for a few steps (shared by the pipeline tests).

``build_tiny_checkpoints(root, stages)`` writes a 2-case phantom dataset and exports one
checkpoint directory per stage under ``root/ckpt`` (the layout ``generate --checkpoint`` reads).
Label-only tests ask for ``("tcss",)``: the slow autoencoder and latent stages are skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

GRID = (16, 16, 24)
TINY = {
    "name": "tiny-e2e",
    "data": {"grid": list(GRID)},
    "text": {"encoder": "trainable", "trainable_dim": 16, "context_dim": 16, "num_queries": 4, "injection_layers": 1, "max_tokens": 16},
    "tcss": {"timesteps": 20, "channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8, "sample_steps": 4,
             "site_gate": 1.0, "site_gate_lesion_scale": True, "size_guidance": 1.0, "temperature": 0.5,
             "train": {"max_steps": 2, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000}},
    "autoencoder": {"channels": [4, 4, 8], "label_embed_dim": 2, "disc_start": 1000, "texture_bins": 2, "texture_quantiles": 8,
                    "train": {"max_steps": 2, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000}},
    "ldm": {"timesteps": 20, "channels": [16, 32], "attention_levels": [False, True], "num_head_channels": 16, "sample_steps": 3,
            "train": {"max_steps": 2, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000}},
}


def write_tiny_data(root: Path) -> Path:
    """A 2-case phantom dataset on a (32, 32, 40) grid."""
    from guidegen.data.phantom_dataset import write_phantom_dataset

    return write_phantom_dataset(root / "data", n=2, grid=(32, 32, 40), seed=7, previews=False, progress=False)


def write_tiny_config(path: Path, **ldm_overrides) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["ldm"].update(ldm_overrides)
    path.write_text(yaml.safe_dump(raw))
    return path


def build_tiny_checkpoints(root: Path, stages: tuple[str, ...] = ("tcss", "autoencoder", "ldm")) -> Path:
    """Checkpoint root ``root/ckpt`` with one exported directory per stage in ``stages``."""
    from guidegen.training.run import run_training

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_tiny_data(root)
        cfg_path = write_tiny_config(root / "tiny.yaml")
        ck = root / "ckpt"
        ck.mkdir()
        for stage in ("tcss", "autoencoder"):
            if stage in stages:
                shutil.copytree(run_training(stage, cfg_path, data, root / f"run_{stage}", progress=False), ck / stage)
        if "ldm" in stages:
            ldm_cfg = write_tiny_config(root / "tiny_ldm.yaml", autoencoder_checkpoint=str(ck / "autoencoder"))
            shutil.copytree(run_training("ldm", ldm_cfg, data, root / "run_ldm", progress=False), ck / "ldm")
    finally:
        torch.set_num_threads(n)
    return ck
