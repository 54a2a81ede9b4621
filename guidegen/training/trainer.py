"""The one training loop shared by the three stages (DESIGN §7, §10).

A stage plugs in by subclassing :class:`StageTask`; :class:`Trainer` does everything else:
device placement, DDP and mixed precision (through HF Accelerate, so the same code runs in one
CPU process or under ``torchrun`` / ``accelerate launch`` on many GPUs and nodes), gradient
accumulation and clipping, EMA, logs, sample hooks, atomic checkpoints and exact resume.

A minimal stage::

    class Regression(StageTask):
        def modules(self):
            return {"model": nn.Linear(4, 1)}

        def training_step(self, batch, step, ctx):
            pred = ctx.modules["model"](batch["x"])
            return {"loss": F.mse_loss(pred, batch["y"])}  # the trainer backprops and steps

    Trainer("runs/reg", TrainConfig(max_steps=100), Regression(), dataset).fit()

A stage with two optimizers (autoencoder + discriminator) drives them itself::

        def training_step(self, batch, step, ctx):
            ae, disc = ctx.modules["model"], ctx.modules["disc"]
            disc.requires_grad_(False)            # generator loss must not fill disc grads
            recon = ae(batch["ct"])
            g_loss = rec_loss(recon, batch["ct"]) - disc(recon).mean()
            ctx.backward(g_loss)
            ctx.step_optimizer("model")
            disc.requires_grad_(True)
            d_loss = hinge(disc(batch["ct"]), disc(recon.detach()))
            ctx.backward(d_loss)
            ctx.step_optimizer("disc")
            return {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}

Run directory layout (``RUN/``)::

    log.jsonl      one JSON object per log step (step, losses, lr, s/step, samples/s), rank 0
    train.log      the same as plain text lines, plus notes (resume, interrupt), rank 0
    tb/            TensorBoard scalars (when tensorboard is installed), rank 0
    curves.png     loss curves, refreshed at every checkpoint, rank 0
    samples/       whatever StageTask.sample writes (PNG montages), rank 0
    checkpoint/    state.pt + meta.json of the latest checkpoint, written atomically by rank 0

Exact resume: a checkpoint holds the weights, EMA, optimizer and grad-scaler states, the step,
the data position (epoch, and the samples of that epoch consumed by all ranks together) and the
RNG states (python, numpy, torch CPU, the CUDA state of the rank's own device) of *every* rank
(gathered to rank 0). The data order is a pure function of ``(seed, epoch)``
(:class:`ResumableBatchSampler`), so a run resumed from step k ends with the same weights as an
uninterrupted run, bit for bit, on the same hardware and world size. Resumed with another world
size, the run continues the same epoch at the batch that holds the first sample not yet consumed
(:func:`resume_position`: nothing is skipped, at most one partial global batch is seen twice) and
with reseeded RNG streams. With
``num_workers > 0``, randomness *inside* ``Dataset.__getitem__`` lives in the worker processes
and is not restored; draw per-item randomness from the item index, or do random augmentation
in ``training_step`` (which uses the restored main-process RNG).

Seeding: every rank seeds ``seed`` before ``StageTask.modules()`` (identical initialisation;
DDP also broadcasts rank 0's weights), then ``seed + rank`` for noise and augmentation. The
RNGs are the process-global ones, so run one training at a time per process.

Parallelism: single process or DDP (gloo on CPU, NCCL on GPUs), launched with ``torchrun`` or
``accelerate launch``; FSDP / DeepSpeed are not supported (gradient clipping and checkpoints
assume full replicas). Multi-node runs need ``RUN/`` on a shared file system.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from guidegen.config import GuideGenConfig, TrainConfig, dump_config
from guidegen.errors import GuideGenError
from guidegen.io import atomic_write, write_json_atomic, write_text_atomic
from guidegen.training.common import launch_rank
from guidegen.training.ema import EMA

CHECKPOINT_DIR = "checkpoint"
_PREV_SUFFIX = ".prev"
_TMP_PREFIX = ".checkpoint.tmp-"
_STATE_FILE = "state.pt"
_FORMAT = 1
# Optimizer steps in a row with a non-finite gradient norm before the run stops with an error
# (each such step is skipped; a few are survivable, a stream of them means diverged weights).
NONFINITE_STEP_LIMIT = 10


# --------------------------------------------------------------------------------------------
# The stage interface
# --------------------------------------------------------------------------------------------


class StepContext:
    """What :meth:`StageTask.training_step` gets besides the batch.

    Attributes:
        modules: the *prepared* modules (DDP-wrapped when distributed, autocast when mixed
            precision). Run forward passes through these so DDP synchronises gradients.
        accelerator: the ``accelerate.Accelerator`` (device, ``is_main_process``, ...).
        cfg: the :class:`TrainConfig` (e.g. ``cfg.gradient_checkpointing``).
        micro_step: index of this micro-batch within the optimizer step (``0..grad_accum-1``).
        sync: True on the last micro-batch, where :meth:`step_optimizer` really steps.
    """

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer
        self.modules: dict[str, nn.Module] = trainer.prepared
        self.accelerator = trainer.accelerator
        self.cfg = trainer.cfg
        self.micro_step = 0
        self.sync = True
        self.backward_called = False
        self.stepped: set[str] = set()
        self.grad_norms: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrap(self, name: str) -> nn.Module:
        """The plain module ``name`` (no DDP wrapper), e.g. for a forward that must not sync."""
        return self._trainer.modules[name]

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a scalar), scaled by 1/grad_accum and by the fp16 scaler."""
        self.backward_called = True
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def step_optimizer(self, name: str) -> float | None:
        """Clip the gradients of optimizer ``name``, step it and zero its gradients.

        On a micro-batch that is not the last of the step (``not ctx.sync``) this does nothing,
        so gradients keep accumulating. Returns the gradient norm before clipping (or None).
        """
        if name not in self._trainer.optimizers:
            raise KeyError(f"no optimizer named {name!r}; have {sorted(self._trainer.optimizers)}")
        if not self.sync:
            return None
        return self._trainer._step_optimizer(name, self)


class StageTask(ABC):
    """A training stage: what to train and how one step computes its losses.

    Subclasses implement :meth:`modules` and :meth:`training_step`; the rest has defaults.

    * :meth:`modules` returns the trainable modules by name, e.g. ``{"model": unet}`` or
      ``{"model": autoencoder, "disc": discriminator}``. Called once per process after seeding
      with ``cfg.seed``, so initialisation is identical on every rank. Frozen helpers (a text
      encoder) can live outside this dict (then they are neither saved nor EMA'd) or inside
      with ``requires_grad_(False)``.
    * :meth:`optimizers` maps names to optimizers; default: one AdamW (``cfg.lr``,
      ``cfg.weight_decay``) per module that has trainable parameters, with the module's name.
    * :meth:`training_step` gets one micro-batch (a dict of tensors on the right device, and
      lists of strings), the optimizer-step index ``step`` (0-based, the same for every
      micro-batch of a step) and a :class:`StepContext`. Two ways to optimise:

      - *simple*: return ``{"loss": tensor, ...}`` without calling ``ctx.backward``; the trainer
        backprops ``loss`` and steps every optimizer;
      - *manual*: call ``ctx.backward(loss)`` and ``ctx.step_optimizer(name)`` yourself (needed
        to alternate generator and discriminator updates). An optimizer you never step is not
        stepped.

      Return a dict of scalars to log (floats or 0-d tensors; detach them). Return the same
      keys on every rank (they are averaged across ranks at log time).
    * :attr:`ema_modules`: names of the modules that get an EMA copy (default ``("model",)``;
      ``()`` for none).
    * :meth:`sample` is called on rank 0 every ``cfg.sample_every`` steps (and at the end; not on
      a step where a stop was requested, and after the step's checkpoint when one is due) with
      the modules to sample from (the EMA copies where there are EMAs, in eval mode), under
      ``torch.no_grad()`` and with an RNG seeded by ``(seed, step)`` that does not disturb the
      training RNG. It writes its own files (e.g. a PNG montage) under ``out_dir``.
    """

    ema_modules: tuple[str, ...] = ("model",)

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The trainable modules by name (on CPU; the trainer moves them)."""

    def optimizers(self, modules: Mapping[str, nn.Module], cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        """Optimizers by name; default one AdamW per module with trainable parameters."""
        out = {}
        for name, module in modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                out[name] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return out

    @abstractmethod
    def training_step(self, batch: dict[str, Any], step: int, ctx: StepContext) -> Mapping[str, float | torch.Tensor]:
        """One micro-batch: compute the losses and (manual mode) backprop and step."""

    def sample(self, modules: Mapping[str, nn.Module], step: int, out_dir: Path) -> None:
        """Write periodic samples (e.g. ``out_dir / f"step{step:07d}.png"``); default: nothing."""


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


def resume_position(epoch: int, samples_done: int, n: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """Where a layout of ``world_size`` ranks × ``batch_size`` resumes after ``samples_done``.

    ``samples_done``: samples of ``epoch`` consumed by all ranks together (batch ``b`` of every
    rank covers positions ``[b·B·W, (b+1)·B·W)`` of the epoch's permutation, see
    :class:`ResumableBatchSampler`). Returns ``(epoch, batch)``, the per-rank batch index whose
    global batch holds the first sample not yet consumed: rounded down, so no sample is skipped
    and fewer than ``batch_size * world_size`` are seen twice. A position at or past the last full
    batch of this layout is the next epoch's start (what the sampler would yield next anyway).
    """
    batch = max(int(samples_done), 0) // (batch_size * world_size)
    if batch >= (n // world_size) // batch_size:
        return epoch + 1, 0
    return epoch, batch


def advance_position(epoch: int, batch: int, batches_per_epoch: int) -> tuple[int, int]:
    """The data position after consuming batch ``batch`` of ``epoch`` (as the sampler yields)."""
    batch += 1
    return (epoch + 1, 0) if batch >= batches_per_epoch else (epoch, batch)


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite stream of index batches for one rank, resumable at (epoch, batch).

    Epoch ``e`` is a permutation of ``range(n)`` drawn from a generator seeded with
    ``(seed, e)``: the same on every rank and in every run. Each rank takes every
    ``world_size``-th index (the tail that does not divide evenly is dropped) and cuts it into
    ``batch_size`` batches (an incomplete last batch is dropped, so every rank runs the same
    number of steps). Iteration starts at ``(start_epoch, start_batch)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_batch: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.batches_per_epoch = (n // world_size) // batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        per_rank = self.n // self.world_size
        mine = perm[: per_rank * self.world_size][self.rank :: self.world_size]
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.start_epoch, self.start_batch
        while True:
            yield from self.epoch_batches(epoch)[start:]
            epoch, start = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# RNG state (per rank) — stored as tensors / plain tuples so the checkpoint loads with
# torch.load(weights_only=True)
# --------------------------------------------------------------------------------------------


def get_rng_state(cuda_device: int | None = None) -> dict:
    """This process's RNG states; CUDA: only device ``cuda_device`` (default the current one).

    One device's state, not ``get_rng_state_all()``: a rank draws on its own device only, and a
    list per *visible* device would not fit a resume with another number of visible devices.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device() if cuda_device is None else cuda_device)
    return state


def pick_cuda_rng_state(saved: Any, device_index: int) -> tuple[torch.Tensor | None, str | None]:
    """The CUDA RNG state to restore on device ``device_index`` from a checkpoint's ``rng["cuda"]``.

    ``saved`` is this rank's device state (a tensor, current format) or, in older checkpoints, a
    list with one state per device that was visible to the process. Returns ``(state, None)``,
    or ``(None, note)`` when nothing fits (the list has no entry for this device index): the
    CUDA RNG then keeps its current state rather than failing the resume.
    """
    if isinstance(saved, torch.Tensor):
        return saved, None
    if isinstance(saved, (list, tuple)):
        if 0 <= device_index < len(saved) and isinstance(saved[device_index], torch.Tensor):
            return saved[device_index], None
        return None, (f"checkpoint holds CUDA RNG states of {len(saved)} visible device(s), none for device "
                      f"{device_index}: CUDA RNG not restored, the run is not bit-identical to an uninterrupted one")
    return None, f"checkpoint's CUDA RNG state is unreadable ({type(saved).__name__}): CUDA RNG not restored"


def set_rng_state(state: dict, cuda_device: int | None = None) -> str | None:
    """Restore :func:`get_rng_state`'s ``state`` (CUDA: on ``cuda_device``, default the current
    device). Returns a note when the CUDA state could not be restored, else None."""
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        index = torch.cuda.current_device() if cuda_device is None else cuda_device
        cuda_state, note = pick_cuda_rng_state(state["cuda"], index)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, index)
        return note
    return None


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with all RNGs seeded by ``seed``; restore the previous states afterwards."""
    saved = get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    seed_everything(seed)
    try:
        yield
    finally:
        set_rng_state(saved)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Atomic directories and checkpoints on disk
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` at ``final``, keeping the old one until then.

    Sequence: ``final`` → ``final.prev``; ``tmp`` → ``final``; delete ``final.prev``. A crash
    at any point leaves either ``final`` or ``final.prev`` complete (:func:`find_checkpoint`
    falls back to ``.prev``).
    """
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    prev = final.with_name(final.name + _PREV_SUFFIX)
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if prev.exists():
        shutil.rmtree(prev)


def make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden directory in ``parent`` with normal (umask) permissions, not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint directory of a run (``checkpoint/``, else ``.prev``)."""
    run = Path(run_dir)
    for cand in (run / CHECKPOINT_DIR, run / (CHECKPOINT_DIR + _PREV_SUFFIX)):
        if (cand / _STATE_FILE).is_file():
            return cand
    return None


def load_training_state(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / _STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / foreign file
        raise GuideGenError(f"{path}: cannot read training checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise GuideGenError(f"{path}: not a guidegen training checkpoint (format {_FORMAT})")
    return state


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    step: int  # optimizer steps completed in total (including before a resume)
    interrupted: bool  # stopped early by SIGINT / SIGTERM (a checkpoint was written)
    resumed_from: int | None  # step of the checkpoint this call resumed from
    last_log: dict = field(default_factory=dict)
    stop_signal: int | None = None  # the signal that stopped this process (None: not stopped, or another rank was)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGINT / SIGTERM to the main process.

    Ctrl-C, ``timeout`` and a cluster's preemption (SLURM signals every process of the job step)
    reach the workers too; a worker that died of the signal made the main process fail with
    "DataLoader worker killed" before it could write its checkpoint. The main process turns
    the signal into a clean stop and shuts its workers down afterwards.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _make_accelerator(mixed_precision: str, cpu: bool, find_unused_parameters: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # Accelerate keeps one process-wide state; a second trainer in the same process with a
    # different precision (e.g. `guidegen train all`) needs it reset first.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    # Under plain `torchrun` on machines without a GPU, Accelerate only sets up gloo DDP when
    # told it runs on CPU (its own launcher does this with --cpu).
    no_gpu = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    if launch_rank()[1] > 1 and no_gpu:
        cpu = True
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[ddp])


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


class Trainer:
    """Train a :class:`StageTask` on a map-style ``dataset`` of dicts, in ``run_dir``.

    Args:
        run_dir: the run directory (created); if it holds a checkpoint, :meth:`fit` resumes.
        cfg: optimisation settings (:class:`guidegen.config.TrainConfig`).
        task: the stage.
        dataset: a ``torch.utils.data.Dataset`` whose items are dicts of tensors / strings.
        progress: show a tqdm progress bar on rank 0.
        cpu: force CPU even when a GPU is present.
        find_unused_parameters: passed to DDP (for modules with branches unused in a step).
        accelerator: an existing ``accelerate.Accelerator`` to use instead of a new one.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: TrainConfig, task: StageTask, dataset: Dataset, *,
                 progress: bool = True, cpu: bool = False, find_unused_parameters: bool = False, accelerator=None):
        self.run_dir = Path(run_dir)
        self.cfg, self.task, self.dataset, self.progress = cfg, task, dataset, progress
        self.accelerator = accelerator or _make_accelerator(cfg.mixed_precision, cpu, find_unused_parameters)
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        device = self.accelerator.device
        # the CUDA device whose RNG this rank saves and restores (None: current device)
        self._cuda_device: int | None = device.index if device.type == "cuda" else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(_TMP_PREFIX + "*"):  # incomplete writes of a killed run
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise GuideGenError("training dataset must be a map-style Dataset with a length") from None
        if (n // self.world_size) // cfg.batch_size < 1:
            raise GuideGenError(f"training dataset has {n} item(s); batch_size {cfg.batch_size} × {self.world_size} process(es) "
                                f"needs at least {cfg.batch_size * self.world_size}")
        self.num_items = n

        # Identical initialisation on every rank, then per-rank streams for noise/augmentation.
        seed_everything(cfg.seed)
        self.modules: dict[str, nn.Module] = dict(task.modules())
        if not self.modules:
            raise GuideGenError("StageTask.modules() returned no modules")
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(task.optimizers(self.modules, cfg))
        missing = [m for m in task.ema_modules if m not in self.modules]
        if missing:
            raise GuideGenError(f"StageTask.ema_modules names unknown module(s) {missing}; modules are {sorted(self.modules)}")

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from: int | None = None
        ckpt = find_checkpoint(self.run_dir)
        state = load_training_state(ckpt) if ckpt is not None else None
        if state is not None:
            self._load_weights_and_optimizers(state)

        # Accelerate: device placement, DDP wrapping, autocast, fp16 grad scaler.
        names, opt_names = list(self.modules), list(self.optimizers)
        prepared = self.accelerator.prepare(*[self.modules[k] for k in names], *[self.optimizers[k] for k in opt_names])
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.prepared = dict(zip(names, prepared[: len(names)]))
        self.accel_optimizers = dict(zip(opt_names, prepared[len(names):]))
        self.modules = {k: self.accelerator.unwrap_model(m) for k, m in self.prepared.items()}
        self.ema: dict[str, EMA] = {k: EMA(self.modules[k], cfg.ema_decay) for k in task.ema_modules}

        if state is not None:
            self._restore_rest(state, ckpt)
        else:
            seed_everything(cfg.seed + self.rank)

        self._history: list[dict] = self._read_history() if self.is_main else []
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._nonfinite_in_a_row: dict[str, int] = {}  # per optimizer: a healthy critic must not hide a diverged model

    # ---------------------------------------------------------------- checkpoint in / out

    def _load_weights_and_optimizers(self, state: dict) -> None:
        for k, m in self.modules.items():
            if k not in state["modules"]:
                raise GuideGenError(f"{self.run_dir}: checkpoint has no module {k!r} (has {sorted(state['modules'])})")
            m.load_state_dict(state["modules"][k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])

    def _restore_rest(self, state: dict, ckpt: Path) -> None:
        for k, ema in self.ema.items():
            if k in state["ema"]:
                ema.load_state_dict(state["ema"][k])
        if self.accelerator.scaler is not None and state.get("scaler") is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.resumed_from = self.step
        saved_epoch, samples_done = int(state["epoch"]), self._saved_samples_done(state)
        self.epoch, self.batch_in_epoch = resume_position(saved_epoch, samples_done, self.num_items,
                                                          self.cfg.batch_size, self.world_size)
        repeated = samples_done - self._samples_done() if self.epoch == saved_epoch else 0
        if (self.epoch, self.batch_in_epoch) != (saved_epoch, int(state["batch_in_epoch"])) or repeated:
            self._note(f"data position: {samples_done} sample(s) of epoch {saved_epoch} were consumed; this layout "
                       f"({self.world_size} process(es) × batch {self.cfg.batch_size}) resumes at epoch {self.epoch}, "
                       f"batch {self.batch_in_epoch}" + (f" ({repeated} sample(s) seen again)" if repeated else ""))
        rngs = state["rng"]
        if state["world_size"] == self.world_size and self.rank < len(rngs):
            note = set_rng_state(rngs[self.rank], self._cuda_device)
            if note:
                self._note(note)
        else:
            seed_everything(self.cfg.seed + self.rank + 1_000_003 * self.step)
            self._note(f"resumed with {self.world_size} process(es) from a checkpoint of {state['world_size']}: "
                       "RNG streams reseeded, the run is not bit-identical to an uninterrupted one")
        saved_cfg = state.get("train_config", {})
        changed = [k for k in ("batch_size", "grad_accum", "seed") if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        if changed:
            self._note(f"resuming with changed {', '.join(changed)}: data order / results differ from the original run")
        self._note(f"resumed from {ckpt.name}/ at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _saved_samples_done(self, state: dict) -> int:
        """A checkpoint's data position as samples of its epoch consumed by all ranks together.

        Checkpoints before ``sample_in_epoch`` hold only the per-rank ``batch_in_epoch``: it is
        converted with the world size and batch size they were saved with.
        """
        if "sample_in_epoch" in state:
            return int(state["sample_in_epoch"])
        batch = int(state["batch_in_epoch"])
        saved_ws = state.get("world_size")
        saved_bs = state.get("train_config", {}).get("batch_size", self.cfg.batch_size)
        if saved_ws is None:  # unknown layout: read the batch index as this layout's, as before
            self._note("checkpoint does not record its world size: its batch index is taken as this layout's")
            saved_ws = self.world_size
        return batch * int(saved_bs) * int(saved_ws)

    def _samples_done(self) -> int:
        return self.batch_in_epoch * self.cfg.batch_size * self.world_size

    def training_state(self) -> dict:
        """This rank's complete training state (RNG of this rank only)."""
        scaler = self.accelerator.scaler
        return {
            "format": _FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,  # per rank; resume reads sample_in_epoch
            "sample_in_epoch": self._samples_done(),
            "world_size": self.world_size,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "ema": {k: e.state_dict() for k, e in self.ema.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": [get_rng_state(self._cuda_device)],
            "train_config": self.cfg.model_dump(mode="json"),
        }

    def save_checkpoint(self) -> None:
        """Write ``RUN/checkpoint/`` atomically. Collective: every rank must call it."""
        rng = get_rng_state(self._cuda_device)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if self.is_main:
            state = self.training_state()
            state["rng"] = gathered
            tmp = make_tmp_dir(self.run_dir, _TMP_PREFIX)
            torch.save(state, tmp / _STATE_FILE)
            write_json_atomic(tmp / "meta.json", {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "sample_in_epoch": self._samples_done(), "world_size": self.world_size, "written_by_rank": self.rank,
                "modules": sorted(self.modules), "ema": sorted(self.ema), "optimizers": sorted(self.optimizers),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "train_config": self.cfg.model_dump(mode="json"),
            })
            replace_dir_atomically(tmp, self.run_dir / CHECKPOINT_DIR)
            self._write_curves()
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- one optimizer step

    def _step_optimizer(self, name: str, ctx: StepContext) -> float | None:
        opt = self.accel_optimizers[name]
        norm = None
        if self.cfg.grad_clip is not None:
            # Unscale (fp16) only this optimizer's gradients: Accelerator.clip_grad_norm_ would
            # unscale every optimizer's, corrupting a second optimizer's accumulating gradients.
            self.accelerator.unscale_gradients(optimizer=opt)
            params = [p for g in self.optimizers[name].param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
            ctx.grad_norms[name] = norm
            # fp16 has its grad scaler for overflows; otherwise a NaN/inf gradient would turn
            # every weight into NaN: skip the update (all ranks see the same reduced norm).
            if not math.isfinite(norm) and self.cfg.mixed_precision != "fp16":
                opt.zero_grad(set_to_none=True)
                ctx.stepped.add(name)
                in_a_row = self._nonfinite_in_a_row[name] = self._nonfinite_in_a_row.get(name, 0) + 1
                self._note(f"step {self.step + 1}: non-finite gradient norm of {name!r}, update skipped "
                           f"({in_a_row} in a row)")
                if in_a_row >= NONFINITE_STEP_LIMIT:
                    raise GuideGenError(f"{self.run_dir}: {NONFINITE_STEP_LIMIT} optimizer steps in a row had non-finite "
                                        f"gradients ({name!r}); training stopped, the last checkpoint is kept")
                return norm
            self._nonfinite_in_a_row[name] = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.stepped.add(name)
        return norm

    def _train_step(self, loader_iter: Iterator[dict], ctx: StepContext) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean logged values."""
        logs: dict[str, list[float]] = {}
        ctx.stepped.clear()
        ctx.grad_norms.clear()
        accum = self.cfg.grad_accum
        for micro in range(accum):
            batch = _to_device(next(loader_iter), self.accelerator.device)
            self.epoch, self.batch_in_epoch = advance_position(self.epoch, self.batch_in_epoch, self._batches_per_epoch)
            ctx.micro_step, ctx.sync, ctx.backward_called = micro, micro == accum - 1, False
            with contextlib.ExitStack() as stack:
                if not ctx.sync:  # DDP: accumulate locally, all-reduce only on the last micro-batch
                    for m in self.prepared.values():
                        stack.enter_context(self.accelerator.no_sync(m))
                out = self.task.training_step(batch, self.step, ctx)
                if not ctx.backward_called:
                    loss = out.get("loss") if isinstance(out, Mapping) else None
                    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
                        raise GuideGenError(f"{type(self.task).__name__}.training_step must return a 'loss' tensor "
                                            "with gradients or call ctx.backward()")
                    ctx.backward(loss)
            for k, v in (out or {}).items():
                logs.setdefault(k, []).append(float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v))
        if not ctx.stepped:  # simple mode: step everything
            for name in self.optimizers:
                self._step_optimizer(name, ctx)
        for k, v in ctx.grad_norms.items():
            logs.setdefault("grad_norm" if len(self.optimizers) == 1 else f"grad_norm/{k}", []).append(v)
        self.step += 1
        for k, ema in self.ema.items():
            ema.update(self.modules[k])
        return {k: sum(v) / len(v) for k, v in logs.items()}

    # ---------------------------------------------------------------- the loop

    def fit(self, max_steps: int | None = None) -> FitResult:
        """Train until ``max_steps`` (default ``cfg.max_steps``) optimizer steps in total.

        Resumes from ``RUN/checkpoint/`` when present. SIGINT / SIGTERM (Ctrl-C, a cluster's
        preemption) finish the current step, write a checkpoint and return with
        ``interrupted=True``; a second Ctrl-C aborts at once.
        """
        cfg = self.cfg
        total = int(max_steps if max_steps is not None else cfg.max_steps)
        if total < 0:
            raise GuideGenError(f"--max-steps must be >= 0, got {total}")
        self._draw_pending_samples()
        if self.step >= total:
            self._note(f"checkpoint is at step {self.step} >= max_steps {total}: nothing to train")
            return FitResult(self.step, False, self.resumed_from)

        sampler = ResumableBatchSampler(self.num_items, cfg.batch_size, cfg.seed, self.rank, self.world_size,
                                        self.epoch, self.batch_in_epoch)
        self._batches_per_epoch = sampler.batches_per_epoch
        # A seeded generator: creating the loader iterator must not consume the global RNG.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=self.accelerator.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + self.rank),
                            worker_init_fn=_ignore_stop_signals if cfg.num_workers > 0 else None)
        # One iterator over an endless sampler serves the whole run; not persistent, so that
        # `del loader_iter` below shuts the workers down (they ignore SIGTERM, see above).
        loader_iter = iter(loader)
        ctx = StepContext(self)
        for m in self.prepared.values():
            m.train()
        for opt in self.accel_optimizers.values():
            opt.zero_grad(set_to_none=True)

        writer = self._open_tensorboard() if self.is_main else None
        bar = self._open_progress(total)
        window: dict[str, list[float]] = {}
        window_time, window_steps, last_log, last_saved = 0.0, 0, {}, self.step
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        self._note(f"training {type(self.task).__name__} from step {self.step} to {total}: {self.world_size} process(es) on "
                   f"{self.accelerator.device.type}, {samples_per_step} samples/step, mixed precision {cfg.mixed_precision}")
        with self._signal_handlers():
            try:
                while self.step < total:
                    t0 = time.perf_counter()
                    logs = self._train_step(loader_iter, ctx)
                    if self.accelerator.device.type == "cuda":
                        torch.cuda.synchronize()
                    window_time += time.perf_counter() - t0
                    window_steps += 1
                    for k, v in logs.items():
                        window.setdefault(k, []).append(v)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if not k.startswith("grad_norm")}, refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == total:
                        last_log = self._log(window, window_time, window_steps, samples_per_step, writer)
                        window, window_time, window_steps = {}, 0.0, 0
                    # Stop check and checkpoint before samples: a SIGTERM on a sample step must not
                    # wait for the sampler (a launcher's grace period is ~30 s), and a kill while
                    # sampling loses nothing.
                    stop = self._stop_everywhere()
                    if stop or self.step % cfg.checkpoint_every == 0 or self.step == total:
                        self.save_checkpoint()
                        last_saved = self.step
                    if stop:
                        if self.step % cfg.sample_every == 0 or self.step == total:
                            self._mark_samples_pending()
                        self._note(f"interrupted: stopped after step {self.step}, checkpoint written")
                        break
                    if self.step % cfg.sample_every == 0 or self.step == total:
                        self._sample()
            finally:
                if bar is not None:
                    bar.close()
                if writer is not None:
                    writer.close()
                del loader_iter
        if last_saved != self.step:  # not reached in the normal flow; kept as a guard
            self.save_checkpoint()
        return FitResult(self.step, self._stop_requested, self.resumed_from, last_log, self._stop_signal)

    # ---------------------------------------------------------------- logging / samples

    def _log(self, window: dict[str, list[float]], elapsed: float, steps: int, samples_per_step: int, writer) -> dict:
        keys = sorted(window)
        means = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        if self.world_size > 1 and keys:
            means = self.accelerator.reduce(means, reduction="mean")
        losses = {k: float(v) for k, v in zip(keys, means.tolist())}
        sec = elapsed / max(steps, 1)
        entry = {"step": self.step, "epoch": self.epoch, **losses}
        for name, opt in self.optimizers.items():
            entry["lr" if len(self.optimizers) == 1 else f"lr/{name}"] = opt.param_groups[0]["lr"]
        entry["sec_per_step"] = sec
        entry["samples_per_sec"] = samples_per_step / sec if sec > 0 else math.nan
        if not self.is_main:
            return entry
        entry["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(self.run_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self._history.append(entry)
        text = " | ".join([f"step {self.step}"] + [f"{k} {v:.5g}" for k, v in losses.items()]
                          + [f"{sec:.3g} s/step", f"{entry['samples_per_sec']:.3g} samples/s"])
        self._append_text(text)
        if writer is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, self.step)
            writer.flush()
        return entry

    def _sample(self) -> None:
        if not self.is_main:
            return
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(exist_ok=True)
        mods = {k: (self.ema[k].module if k in self.ema else m) for k, m in self.modules.items()}
        was_training = {k: m.training for k, m in mods.items()}
        for m in mods.values():
            m.eval()
        try:
            with isolated_rng(self.cfg.seed * 1_000_003 + self.step), torch.no_grad():
                self.task.sample(mods, self.step, out_dir)
        finally:
            for k, m in mods.items():
                m.train(was_training[k])

    def _pending_samples_file(self) -> Path:
        return self.run_dir / "samples" / ".pending_step"

    def _mark_samples_pending(self) -> None:
        """A stop on a sample step skips its samples (see fit); the resume draws them."""
        if self.is_main:
            self._pending_samples_file().parent.mkdir(exist_ok=True)
            write_text_atomic(self._pending_samples_file(), f"{self.step}\n")

    def _draw_pending_samples(self) -> None:
        """Draw the samples a stop skipped, when the run resumes from that very step (same
        isolated RNG seed, so the same samples as an uninterrupted run's)."""
        pending = self._pending_samples_file()
        if not self.is_main or not pending.is_file():
            return
        if pending.read_text().strip() == str(self.step):
            self._note(f"drawing the samples of step {self.step}, skipped when the run was stopped")
            self._sample()
        pending.unlink()

    def _note(self, text: str) -> None:
        if self.is_main:
            self._append_text(f"[note] {text}")

    def _append_text(self, text: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / "train.log", "a") as fh:
            fh.write(f"{stamp} {text}\n")

    def _read_history(self) -> list[dict]:
        """Log entries up to the resumed step; entries a killed run logged later are dropped."""
        path = self.run_dir / "log.jsonl"
        if not path.is_file():
            return []
        kept = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("step", math.inf) <= self.step:
                    kept.append(entry)
        write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
        return kept

    def _write_curves(self) -> None:
        keys = sorted({k for e in self._history for k, v in e.items()
                       if isinstance(v, (int, float)) and k not in ("step", "epoch", "sec_per_step", "samples_per_sec")
                       and not k.startswith(("lr", "grad_norm"))})
        if not keys:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, k in zip(axes[:, 0], keys):
            pts = [(e["step"], e[k]) for e in self._history if k in e and math.isfinite(e[k])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, lw=1.2)
                if min(ys) > 0 and max(ys) / min(ys) > 20:
                    ax.set_yscale("log")
            ax.set_ylabel(k)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{type(self.task).__name__} — {self.run_dir.name}")
        fig.tight_layout()
        with atomic_write(self.run_dir / "curves.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard is optional
            self._note(f"TensorBoard disabled ({type(exc).__name__}: {exc})")
            return None
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.resumed_from else None)

    def _open_progress(self, total: int):
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step, desc=type(self.task).__name__, dynamic_ncols=True)

    # ---------------------------------------------------------------- graceful stop

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._stop_requested = True
            self._stop_signal = self._stop_signal or signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_everywhere(self) -> bool:
        """True when any rank was asked to stop (all ranks must stop after the same step)."""
        if self.world_size == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        self._stop_requested = bool(flag.item() > 0)
        return self._stop_requested

    # ---------------------------------------------------------------- access

    def ema_or_model(self, name: str = "model") -> nn.Module:
        """The module to use for inference: its EMA copy if it has one, else the live module."""
        return self.ema[name].module if name in self.ema else self.modules[name]


# --------------------------------------------------------------------------------------------
# Small inference checkpoints (DESIGN §7)
# --------------------------------------------------------------------------------------------


def _inference_weights(source: "Trainer | str | os.PathLike", module: str, use_ema: bool) -> tuple[dict, str, int]:
    if isinstance(source, Trainer):
        if module not in source.modules:
            raise GuideGenError(f"no module {module!r} in the trainer (has {sorted(source.modules)})")
        if use_ema and module in source.ema:
            return source.ema[module].module.state_dict(), "ema", source.step
        return source.modules[module].state_dict(), "raw", source.step
    ckpt = find_checkpoint(source)
    if ckpt is None:
        raise GuideGenError(f"{source}: no training checkpoint found (expected {CHECKPOINT_DIR}/{_STATE_FILE})")
    state = load_training_state(ckpt)
    if module not in state["modules"]:
        raise GuideGenError(f"{ckpt}: no module {module!r} in checkpoint (has {sorted(state['modules'])})")
    if use_ema and module in state["ema"]:
        return state["ema"][module]["module"], "ema", int(state["step"])
    return state["modules"][module], "raw", int(state["step"])


def export_checkpoint(source: "Trainer | str | os.PathLike", out_dir: str | os.PathLike, stage_name: str,
                      config: GuideGenConfig, meta: Mapping[str, Any] | None = None, *, module: str = "model",
                      use_ema: bool = True, half: bool = True) -> Path:
    """Write a small inference checkpoint directory (DESIGN §7), atomically.

    ``out_dir/model.safetensors`` holds ``module``'s weights (its EMA if it has one and
    ``use_ema``), floating tensors as float16 when ``half``; ``config.yaml`` the full config;
    ``meta.json`` ``{"stage", "weights": "ema"|"raw", "dtype", "train_steps", ...meta}``
    (the caller adds label set, text encoder, latent scale, spacing/extent). ``source`` is a
    :class:`Trainer` or a run directory with a checkpoint. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    state, kind, steps = _inference_weights(source, module, use_ema)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous().clone()
               for k, v in state.items()}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(out.parent, f".{out.name}.tmp-")
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"stage": stage_name, "weights": kind})
        (tmp / "config.yaml").write_text(dump_config(config))
        info = {"stage": stage_name, "weights": kind, "dtype": str(dtype).removeprefix("torch."), "train_steps": steps,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        info.update(dict(meta or {}))
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        replace_dir_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model_weights(module: nn.Module, ckpt_dir: str | os.PathLike, *, strict: bool = True,
                       may_lack: tuple[str, ...] = (), may_differ: tuple[str, ...] = ()) -> dict:
    """Load ``ckpt_dir/model.safetensors`` into ``module`` (fp16 → the module's dtypes).

    ``may_lack``: key prefixes of the module the file may lack even when ``strict`` (modules
    added to a trained network whose initialisation leaves its output unchanged); they keep
    their initial values. ``may_differ``: key prefixes whose values are measured again at export
    (the AE's texture tables), so a file holding them in another shape (another
    ``texture_depths``) leaves them at their initial values instead of failing. The module's own
    ``LOAD_MAY_LACK`` prefixes are added to ``may_lack`` for every load (keys newer than some
    shipped checkpoints whose initial value is what those checkpoints meant). Returns the
    checkpoint's ``meta.json`` as a dict (``{}`` if absent).
    Raises :class:`GuideGenError` naming the file when it is missing, unreadable or does not match.
    """
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise GuideGenError(f"{path}: checkpoint weights not found")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise GuideGenError(f"{path}: cannot read safetensors ({type(exc).__name__})") from None
    may_lack = (*may_lack, *getattr(module, "LOAD_MAY_LACK", ()))
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(tensors) if not k.startswith(may_lack))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise GuideGenError(f"{path}: weights do not match the model (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    reshaped = {k for k in tensors if k in own and k.startswith(may_differ) and tensors[k].shape != own[k].shape}
    tensors = {k: v for k, v in tensors.items() if k not in reshaped}
    bad = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if bad:
        raise GuideGenError(f"{path}: shape mismatch for {bad[0]} ({tuple(tensors[bad[0]].shape)} in file, "
                            f"{tuple(own[bad[0]].shape)} in the model)")
    cast = {k: v.to(own[k].dtype) for k, v in tensors.items() if k in own}
    lacking = any(k not in tensors for k in own)
    module.load_state_dict(cast, strict=strict and not lacking and not reshaped)
    return read_checkpoint_meta(ckpt_dir)


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict:
    """An exported checkpoint's ``meta.json`` as a dict (``{}`` if absent)."""
    meta_path = Path(ckpt_dir) / "meta.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
