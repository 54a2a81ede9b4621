"""Pieces the training stages share: the text condition of a batch, per-class loss weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from guidegen.labels import LabelSet
from guidegen.text.findings import Findings, parse_findings
from guidegen.text.knowledge import TextConditioner


def launch_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under torchrun / accelerate (their ``RANK`` and
    ``WORLD_SIZE``), ``(0, 1)`` in a plain process; readable before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def warn_run(text: str, out: Path | None) -> None:
    """A ``warning:`` line on stderr and in the run's ``train.log``, from the main process only
    (every rank of a torchrun job would repeat it)."""
    import sys
    from datetime import datetime

    if launch_rank()[0] != 0:
        return
    print(f"warning: {text}", file=sys.stderr)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "a") as fh:
            fh.write(f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} [warning] {text}\n")


def findings_of(text: str, findings_json: str | None) -> Findings:
    """The stored findings of a case when the dataset has them, else those parsed from its text.

    Stored findings (phantom ground truth, or parsed once by ``prepare``) are preferred: they
    are what the case shows, even when the report omits a field.
    """
    stored = json.loads(findings_json) if findings_json else None
    return Findings.from_dict(stored) if stored else parse_findings(text)


def batch_condition(conditioner: TextConditioner, batch: dict, device: torch.device) -> dict[str, Tensor]:
    """``{"tokens" (B, L, D), "mask" (B, L), "findings_vec" (B, F)}`` on ``device`` for a batch."""
    texts = list(batch["text"])
    jsons = list(batch.get("findings_json", [None] * len(texts)))
    cond = conditioner.prepare(texts, [findings_of(t, j) for t, j in zip(texts, jsons)])
    return {k: v.to(device) for k, v in cond.items()}


def text_cache_dir(data_root: str | Path) -> Path:
    """Embedding cache location inside a dataset (frozen encoders only)."""
    return Path(data_root) / "cache" / "text"


def class_weight_vector(weights: dict[str, float], label_set: LabelSet) -> Tensor | None:
    """(K,) loss weights: ``weights`` (class name → weight) over ones, or None when empty."""
    if not weights:
        return None
    w = torch.ones(label_set.num_classes)
    for name, value in weights.items():
        w[label_set.id_of(name)] = value
    return w


# the cache barrier waits for the slowest rank's share of the preprocessing / encoding
CACHE_BARRIER_TIMEOUT_H = 48


def distributed_barrier() -> Callable[[], None]:
    """A barrier over the processes of a torchrun job, usable before the Trainer's Accelerator exists.

    Sets up the process group through ``accelerate.PartialState`` (with the same ``cpu`` choice
    as :func:`guidegen.training.trainer._make_accelerator`), which the Trainer's Accelerator then
    reuses, and a gloo group with a long timeout for the barrier itself: the ranks reach it after
    building their share of a cache, possibly hours apart, past the default group's (NCCL:
    10 min) timeout. Called by every rank at the same point, before any of that work.
    """
    from datetime import timedelta

    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=CACHE_BARRIER_TIMEOUT_H))

    def barrier() -> None:
        dist.barrier(group=group)
        dist.destroy_process_group(group)

    return barrier


def build_cache_on_ranks(dataset, progress: bool = True) -> None:
    """Build ``dataset``'s missing cache entries (a grid cache, or the LDM's latents), sharded over
    the processes of a torchrun job (``RANK`` / ``WORLD_SIZE``): each builds its share, then all
    wait until every share is done. A single process builds everything, as before."""
    rank, world = launch_rank()
    if world <= 1:
        dataset.build_cache(progress=progress)
        return
    barrier = distributed_barrier()
    dataset.build_cache(progress=progress and rank == 0, rank=rank, world_size=world, barrier=barrier)
