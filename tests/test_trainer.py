"""Tests of the shared training engine (guidegen.training.trainer).

The file doubles as the worker script for the subprocess tests:
``python tests/test_trainer.py train RUN MAX_STEPS SLEEP [WORKERS]`` (kill -9 and SIGTERM tests) and
``python -m torch.distributed.run --nproc_per_node=2 tests/test_trainer.py ddp OUT`` (DDP test).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from guidegen.config import TrainConfig, load_config  # noqa: E402
from guidegen.errors import GuideGenError  # noqa: E402
from guidegen.training import EMA, ResumableBatchSampler, StageTask, Trainer, export_checkpoint, load_model_weights  # noqa: E402
from guidegen.training import trainer as trainer_mod  # noqa: E402
from guidegen.training.trainer import find_checkpoint, load_training_state  # noqa: E402

# ------------------------------------------------------------------------------ tiny tasks


class ToyData(Dataset):
    """24 items {x (4,), y (1,), idx, name}: y is a fixed linear function of x."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.25

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "idx": torch.tensor(i), "name": f"case{i}"}


class Regression(StageTask):
    """Simple mode: return {'loss'}; input noise exercises the (restored) torch RNG."""

    def __init__(self, sleep: float = 0.0, interrupt_at: int | None = None, sample_draws: bool = False):
        self.seen: list[list[int]] = []
        self.sleep, self.interrupt_at, self.sample_draws = sleep, interrupt_at, sample_draws
        self.sampled: list[tuple[int, bool]] = []

    def modules(self):
        return {"model": nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))}

    def training_step(self, batch, step, ctx):
        self.seen.append(batch["idx"].tolist())
        assert batch["name"] == [f"case{i}" for i in batch["idx"].tolist()]
        if self.interrupt_at == step:
            os.kill(os.getpid(), signal.SIGINT)
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
        return {"loss": F.mse_loss(ctx.modules["model"](x), batch["y"])}

    def sample(self, modules, step, out_dir):
        if self.sample_draws:
            torch.randn(100)  # must not disturb the training RNG
        self.sampled.append((step, not modules["model"].training))
        (out_dir / f"step{step:04d}.txt").write_text("ok")


class GanLike(StageTask):
    """Manual mode with two optimizers: a generator and a critic updated alternately."""

    def modules(self):
        return {"model": nn.Linear(4, 4), "disc": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))}

    def optimizers(self, modules, cfg):
        return {"model": torch.optim.AdamW(modules["model"].parameters(), lr=cfg.lr),
                "disc": torch.optim.SGD(modules["disc"].parameters(), lr=cfg.lr, momentum=0.9)}

    def training_step(self, batch, step, ctx):
        gen, disc = ctx.modules["model"], ctx.modules["disc"]
        x = batch["x"]
        fake = gen(torch.randn_like(x))
        disc.requires_grad_(False)
        g_loss = F.softplus(-disc(fake)).mean() + 0.1 * (fake.mean() - x.mean()) ** 2
        ctx.backward(g_loss)
        ctx.step_optimizer("model")
        disc.requires_grad_(True)
        d_loss = F.softplus(-disc(x)).mean() + F.softplus(disc(fake.detach())).mean()
        ctx.backward(d_loss)
        ctx.step_optimizer("disc")
        return {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, batch_size=4, max_steps=6, ema_decay=0.9, log_every=1, sample_every=1000,
                checkpoint_every=1000, seed=7, grad_clip=1.0)
    base.update(kw)
    return TrainConfig(**base)


def final_state(run: Path) -> dict:
    return load_training_state(find_checkpoint(run))


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for group in ("modules", "ema", "optimizers"):
        assert a[group].keys() == b[group].keys()
    for name in a["modules"]:
        for k, v in a["modules"][name].items():
            assert torch.equal(v, b["modules"][name][k]), f"{name}.{k} differs"
    for name in a["ema"]:
        for k, v in a["ema"][name]["module"].items():
            assert torch.equal(v, b["ema"][name]["module"][k]), f"ema {name}.{k} differs"
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        for pid in sa:
            for k, v in sa[pid].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[pid][k])), f"optimizer {name} {k} differs"


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


# ------------------------------------------------------------------------------ unit pieces


def test_batch_sampler_shards_epochs_and_resumes():
    s0 = ResumableBatchSampler(10, 2, seed=3, rank=0, world_size=2)
    s1 = ResumableBatchSampler(10, 2, seed=3, rank=1, world_size=2)
    assert s0.batches_per_epoch == 2  # 5 per rank → 2 full batches of 2
    e0 = sum(s0.epoch_batches(0), []) + sum(s1.epoch_batches(0), [])
    assert len(set(e0)) == 8 and set(e0) <= set(range(10))  # ranks disjoint
    assert s0.epoch_batches(0) != s0.epoch_batches(1)  # reshuffled per epoch
    it = iter(s0)
    stream = [next(it) for _ in range(5)]
    resumed = ResumableBatchSampler(10, 2, seed=3, rank=0, world_size=2, start_epoch=1, start_batch=1)
    assert next(iter(resumed)) == stream[3]


def test_ema_warmup_and_state_roundtrip():
    src = nn.Linear(3, 2)
    ema = EMA(src, decay=0.99)
    init = ema.module.weight.clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    ema.update(src)  # decay_0 = min(0.99, 1/10) → ema = init + 0.9 (src - init)
    torch.testing.assert_close(ema.module.weight, init + 0.9 * (src.weight - init))
    assert not ema.module.weight.requires_grad
    other = EMA(nn.Linear(3, 2), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.module.weight, ema.module.weight)


# ------------------------------------------------------------------------------ training


def test_loss_decreases_and_logs_are_written(tmp_path):
    task = Regression()
    run = tmp_path / "run"
    tr = Trainer(run, cfg(max_steps=60, log_every=5, sample_every=30, checkpoint_every=30), task, ToyData(), progress=False)
    res = tr.fit()
    assert res.step == 60 and not res.interrupted and res.resumed_from is None
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(5, 61, 5))
    assert {"loss", "lr", "grad_norm", "sec_per_step", "samples_per_sec", "epoch"} <= log[0].keys()
    assert log[-1]["loss"] < 0.2 * log[0]["loss"]
    assert (run / "curves.png").stat().st_size > 1000 and (run / "train.log").read_text().count("step 60") == 1
    assert any((run / "tb").iterdir())
    assert task.sampled == [(30, True), (60, True)]  # rank 0, eval-mode EMA copy
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step0030.txt", "step0060.txt"]
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 60 and meta["written_by_rank"] == 0


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_exact_resume_matches_uninterrupted(tmp_path, grad_accum):
    # 24 items / batch 4 = 6 batches per epoch: 6 steps × grad_accum crosses epoch boundaries.
    c = cfg(grad_accum=grad_accum, sample_every=2)
    full = Regression(sample_draws=True)
    Trainer(tmp_path / "a", c, full, ToyData(), progress=False).fit()
    first, second = Regression(sample_draws=True), Regression(sample_draws=True)
    r1 = Trainer(tmp_path / "b", c, first, ToyData(), progress=False).fit(max_steps=3)
    assert r1.step == 3
    tr2 = Trainer(tmp_path / "b", c, second, ToyData(), progress=False)
    assert tr2.step == 3 and tr2.resumed_from == 3
    r2 = tr2.fit()
    assert r2.step == 6 and r2.resumed_from == 3
    assert first.seen + second.seen == full.seen  # identical data order
    assert len(full.seen) == 6 * grad_accum
    assert_same_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    log_steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_steps == [1, 2, 3, 4, 5, 6]


def test_sample_hook_does_not_change_training(tmp_path):
    # Sequential: trainers in one process share the global RNG, one training at a time.
    a = Trainer(tmp_path / "a", cfg(max_steps=4, sample_every=1), Regression(sample_draws=True), ToyData(), progress=False)
    a.fit()
    b = Trainer(tmp_path / "b", cfg(max_steps=4), Regression(), ToyData(), progress=False)
    b.fit()
    for k, v in a.modules["model"].state_dict().items():
        assert torch.equal(v, b.modules["model"].state_dict()[k])


def test_two_optimizers_train_and_resume_exactly(tmp_path):
    c = cfg(max_steps=6, grad_accum=2)
    a = Trainer(tmp_path / "a", c, GanLike(), ToyData(), progress=False)
    assert set(a.optimizers) == {"model", "disc"} and set(a.ema) == {"model"}
    before = {k: v.clone() for k, v in a.modules["disc"].state_dict().items()}
    res = a.fit()
    assert {"g_loss", "d_loss", "grad_norm/model", "grad_norm/disc", "lr/model", "lr/disc"} <= res.last_log.keys()
    assert any(not torch.equal(v, a.modules["disc"].state_dict()[k]) for k, v in before.items())  # critic trained
    Trainer(tmp_path / "b", c, GanLike(), ToyData(), progress=False).fit(max_steps=4)
    Trainer(tmp_path / "b", c, GanLike(), ToyData(), progress=False).fit()
    state_a, state_b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert set(state_a["optimizers"]) == {"model", "disc"}
    assert state_a["optimizers"]["disc"]["state"][0]["momentum_buffer"].abs().sum() > 0
    assert_same_state(state_a, state_b)


def test_checkpoint_is_atomic_and_partial_writes_are_ignored(tmp_path):
    run = tmp_path / "run"
    Trainer(run, cfg(max_steps=3, checkpoint_every=1), Regression(), ToyData(), progress=False).fit()
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["meta.json", "state.pt"]
    # A run killed while writing leaves a temp dir: it is ignored and cleaned up.
    junk = run / ".checkpoint.tmp-dead"
    junk.mkdir()
    (junk / "state.pt").write_bytes(b"\x00partial")
    tr = Trainer(run, cfg(max_steps=3), Regression(), ToyData(), progress=False)
    assert tr.step == 3 and not junk.exists()
    # Killed between the two renames: only checkpoint.prev exists → resume from it.
    os.replace(run / "checkpoint", run / "checkpoint.prev")
    tr = Trainer(run, cfg(max_steps=4), Regression(), ToyData(), progress=False)
    assert tr.step == 3
    tr.fit()
    assert find_checkpoint(run).name == "checkpoint" and not (run / "checkpoint.prev").exists()
    assert final_state(run)["step"] == 4
    # A corrupt checkpoint is a one-line user error, not a traceback from torch.
    (run / "checkpoint" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(GuideGenError, match=r"state\.pt: cannot read training checkpoint"):
        Trainer(run, cfg(), Regression(), ToyData(), progress=False)


def test_sigint_stops_cleanly_with_checkpoint(tmp_path):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    res = Trainer(run, cfg(max_steps=10), Regression(interrupt_at=2), ToyData(), progress=False).fit()
    assert res.interrupted and res.step == 3 and res.stop_signal == signal.SIGINT
    assert final_state(run)["step"] == 3
    assert "interrupted" in (run / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


class NanLossAt(Regression):
    """Regression whose loss is NaN at the given steps (``None``: always)."""

    def __init__(self, steps: set[int] | None):
        super().__init__()
        self.nan_steps = steps

    def training_step(self, batch, step, ctx):
        out = super().training_step(batch, step, ctx)
        if self.nan_steps is None or step in self.nan_steps:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_gradient_skips_the_update(tmp_path):
    trainer = Trainer(tmp_path / "run", cfg(max_steps=1), NanLossAt({0}), ToyData(), progress=False)
    before = {k: v.clone() for k, v in trainer.modules["model"].state_dict().items()}
    trainer.fit()
    after = trainer.modules["model"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN step changed nothing
    assert "step 1: non-finite gradient norm of 'model', update skipped" in (tmp_path / "run" / "train.log").read_text()
    trainer.fit(max_steps=3)  # later finite steps train again
    assert all(torch.isfinite(v).all() for v in trainer.modules["model"].state_dict().values())
    assert not all(torch.equal(before[k], v) for k, v in trainer.modules["model"].state_dict().items())


def test_a_stream_of_nonfinite_gradients_stops_the_run(tmp_path):
    with pytest.raises(GuideGenError, match="10 optimizer steps in a row had non-finite gradients"):
        Trainer(tmp_path / "run", cfg(max_steps=20), NanLossAt(None), ToyData(), progress=False).fit()


class GanDivergedGenerator(GanLike):
    """GanLike whose generator loss is always NaN while the critic's stays finite."""

    def training_step(self, batch, step, ctx):
        gen, disc = ctx.modules["model"], ctx.modules["disc"]
        fake = gen(torch.randn_like(batch["x"]))
        ctx.backward(fake.mean() * float("nan"))
        ctx.step_optimizer("model")
        d_loss = F.softplus(-disc(batch["x"])).mean() + F.softplus(disc(fake.detach())).mean()
        ctx.backward(d_loss)
        ctx.step_optimizer("disc")
        return {"d_loss": d_loss.detach()}


def test_nonfinite_streak_is_counted_per_optimizer(tmp_path):
    # the critic's finite steps must not reset the generator's streak
    with pytest.raises(GuideGenError, match=r"non-finite gradients \('model'\)"):
        Trainer(tmp_path / "run", cfg(max_steps=20), GanDivergedGenerator(), ToyData(), progress=False).fit()


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(GuideGenError, match="has 3 item.*needs at least 4"):
        Trainer(tmp_path / "r", cfg(), Regression(), ToyData(3), progress=False)

    class NoLoss(Regression):
        def training_step(self, batch, step, ctx):
            return {"loss": 1.0}

    with pytest.raises(GuideGenError, match="must return a 'loss' tensor"):
        Trainer(tmp_path / "r2", cfg(), NoLoss(), ToyData(), progress=False).fit()

    class BadEma(Regression):
        ema_modules = ("unet",)

    with pytest.raises(GuideGenError, match="ema_modules names unknown module"):
        Trainer(tmp_path / "r3", cfg(), BadEma(), ToyData(), progress=False)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    tr = Trainer(tmp_path / "r", cfg(max_steps=3, mixed_precision="bf16"), Regression(), ToyData(), progress=False)
    assert tr.accelerator.mixed_precision == "bf16"
    res = tr.fit()
    assert np.isfinite(res.last_log["loss"])
    assert tr.modules["model"][0].weight.dtype == torch.float32  # master weights stay fp32


# ------------------------------------------------------------------------------ export


def test_export_and_load_roundtrip(tmp_path):
    run = tmp_path / "run"
    tr = Trainer(run, cfg(max_steps=5), Regression(), ToyData(), progress=False)
    tr.fit()
    full_cfg = load_config("demo")
    out = export_checkpoint(tr, tmp_path / "ckpt", "tcss", full_cfg, {"label_set": "guidegen22"})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "model.safetensors"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "tcss" and meta["weights"] == "ema" and meta["dtype"] == "float16"
    assert meta["train_steps"] == 5 and meta["label_set"] == "guidegen22"
    assert load_config(out / "config.yaml") == full_cfg

    fresh = Regression().modules()["model"]
    got = load_model_weights(fresh, out)
    assert got["stage"] == "tcss"
    ema_sd = tr.ema["model"].module.state_dict()
    for k, v in fresh.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, ema_sd[k], rtol=1e-3, atol=1e-3)
    assert any(not torch.equal(v, tr.modules["model"].state_dict()[k]) for k, v in ema_sd.items())  # EMA ≠ raw

    # From the run directory, full precision, raw weights: exact; re-export replaces atomically.
    out2 = export_checkpoint(run, tmp_path / "ckpt", "tcss", full_cfg, use_ema=False, half=False)
    fresh2 = Regression().modules()["model"]
    load_model_weights(fresh2, out2)
    for k, v in fresh2.state_dict().items():
        assert torch.equal(v, tr.modules["model"].state_dict()[k])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(GuideGenError, match="model.safetensors: weights do not match"):
        load_model_weights(nn.Linear(4, 1), out2)
    with pytest.raises(GuideGenError, match="model.safetensors: checkpoint weights not found"):
        load_model_weights(fresh2, tmp_path / "nowhere")


# ------------------------------------------------------------------------------ processes


def _launch_train(run: Path, max_steps: int, sleep: float, workers: int = 0, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "train", str(run), str(max_steps), str(sleep), str(workers)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        meta = run / "checkpoint" / "meta.json"
        if meta.is_file() and json.loads(meta.read_text())["step"] >= step:
            return
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    pytest.fail(f"worker never reached step {step}")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_to_process_group_with_loader_workers_stops_cleanly(tmp_path):
    # `timeout`, SLURM preemption and Ctrl-C signal the whole process group, DataLoader workers
    # included; the run must still end with its checkpoint, not "DataLoader worker killed".
    run = tmp_path / "run"
    proc = _launch_train(run, 200, 0.1, workers=2, start_new_session=True)
    try:
        _wait_for_step(proc, run, 2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-2000:]
    stopped_at = final_state(run)["step"]
    assert 2 <= stopped_at < 200
    assert f"interrupted: stopped after step {stopped_at}" in (run / "train.log").read_text()


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    run = tmp_path / "run"
    proc = _launch_train(run, 8, 0.3)
    try:
        _wait_for_step(proc, run, 3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = final_state(run)["step"]
    assert 3 <= killed_at < 8
    done = _launch_train(run, 8, 0.0)
    out, _ = done.communicate(timeout=90)
    assert done.returncode == 0, out.decode()
    assert f"resumed from checkpoint/ at step {killed_at}" in (run / "train.log").read_text()

    ref = tmp_path / "ref"
    Trainer(ref, cfg(max_steps=8, checkpoint_every=1), Regression(), ToyData(), progress=False).fit()
    assert_same_state(final_state(ref), final_state(run))


def test_ddp_two_gloo_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "ddp", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("a", "b"):
        hashes = [(tmp_path / f"{run}.rank{r}.json").read_text() for r in (0, 1)]
        info = [json.loads(h) for h in hashes]
        assert info[0]["hash"] == info[1]["hash"] and info[0]["ema_hash"] == info[1]["ema_hash"]
        assert (info[0]["world_size"], info[1]["rank"]) == (2, 1)
        # 24 items / 2 ranks / batch 4 = 3 batches per rank per epoch: epoch 0 splits the data.
        epoch0 = [[i for b in inf["seen"][:3] for i in b] for inf in info]
        assert len(info[0]["seen"]) == 4 and sorted(epoch0[0] + epoch0[1]) == list(range(24))
        meta = json.loads((tmp_path / run / "checkpoint" / "meta.json").read_text())
        assert meta["written_by_rank"] == 0 and meta["world_size"] == 2 and meta["step"] == 4
        assert len(final_state(tmp_path / run)["rng"]) == 2
        assert not list((tmp_path / run).glob(".checkpoint.tmp-*"))
    wrote = sorted(p.name for p in tmp_path.glob("wrote.*"))
    assert wrote and all(name.startswith("wrote.rank0.") for name in wrote)
    # run a: 2 steps, then a new Trainer resumed to 4; run b: 4 straight → same weights.
    assert json.loads((tmp_path / "a.rank0.json").read_text())["hash"] == json.loads((tmp_path / "b.rank0.json").read_text())["hash"]
    assert_same_state(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


# ------------------------------------------------------------------------------ workers


def _state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker_train(run: str, max_steps: int, sleep: float, workers: int = 0) -> None:
    Trainer(run, cfg(max_steps=max_steps, checkpoint_every=1, num_workers=workers), Regression(sleep=sleep), ToyData(),
            progress=False).fit()


def _worker_ddp(out: str) -> None:
    out_dir = Path(out)
    rank = int(os.environ["RANK"])
    original = trainer_mod.replace_dir_atomically

    def spy(tmp, final):  # record which rank writes checkpoints
        (out_dir / f"wrote.rank{rank}.{final.parent.name}.{time.time_ns()}").write_text("")
        original(tmp, final)

    trainer_mod.replace_dir_atomically = spy
    c = cfg(max_steps=4, checkpoint_every=2)
    for run, plan in (("a", (2, 4)), ("b", (4,))):
        seen = []
        for steps in plan:
            task = Regression()
            tr = Trainer(out_dir / run, c, task, ToyData(), progress=False)
            tr.fit(max_steps=steps)
            seen += task.seen
        info = {"rank": tr.rank, "world_size": tr.world_size, "hash": _state_hash(tr.modules["model"]),
                "ema_hash": _state_hash(tr.ema["model"].module), "seen": seen}
        (out_dir / f"{run}.rank{rank}.json").write_text(json.dumps(info))
    tr.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        _worker_train(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif sys.argv[1] == "ddp":
        _worker_ddp(sys.argv[2])
