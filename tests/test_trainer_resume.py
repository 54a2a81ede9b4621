"""Resume across layouts and the order of work at the end of a step (guidegen.training.trainer).

* CUDA RNG state: one device's state is saved; older checkpoints with one state per visible
  device restore the current device's entry or skip it with a note (never an IndexError).
* Data position: a global sample offset within the epoch, converted to the batch index of the
  resuming layout (world size 4 → 8 and 8 → 4 skip no sample; the counter follows the sampler).
* Stop before samples: a stop on a sample step writes the checkpoint and no sample; the
  resume draws that step's samples.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from guidegen.training import ResumableBatchSampler, Trainer
from guidegen.training import trainer as trainer_mod
from guidegen.training.run import _export_identity, _wait_for_export
from guidegen.training.trainer import (
    advance_position,
    find_checkpoint,
    get_rng_state,
    load_training_state,
    pick_cuda_rng_state,
    replace_dir_atomically,
    resume_position,
    set_rng_state,
)
from test_trainer import Regression, ToyData, cfg  # tests/ is on sys.path

# ------------------------------------------------------------------------------ CUDA RNG state


def test_pick_cuda_rng_state_from_current_and_older_checkpoints():
    one = torch.arange(5, dtype=torch.uint8)
    assert pick_cuda_rng_state(one, 3) == (one, None)  # current format: this rank's device state
    per_device = [torch.full((5,), i, dtype=torch.uint8) for i in range(8)]  # saved with 8 visible
    state, note = pick_cuda_rng_state(per_device, 2)
    assert note is None and torch.equal(state, per_device[2])
    state, note = pick_cuda_rng_state(per_device[:2], 3)  # saved with 2 visible, now on device 3
    assert state is None and "none for device 3" in note
    state, note = pick_cuda_rng_state(None, 0)
    assert state is None and "unreadable" in note


class FakeCuda:
    """Stands in for torch.cuda on a CPU machine: 4 visible devices, current device 1."""

    def __init__(self, monkeypatch, visible: int = 4, current: int = 1):
        self.visible, self.current, self.restored = visible, current, []
        for name in ("is_available", "is_initialized"):
            monkeypatch.setattr(trainer_mod.torch.cuda, name, lambda: True)
        monkeypatch.setattr(trainer_mod.torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(trainer_mod.torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(trainer_mod.torch.cuda, "set_rng_state", lambda s, d: self.restored.append((s, d)))

        def all_devices(*a):  # what set_rng_state_all does with a longer list: default_generators[i]
            raise IndexError("tuple index out of range")

        monkeypatch.setattr(trainer_mod.torch.cuda, "get_rng_state_all", all_devices)
        monkeypatch.setattr(trainer_mod.torch.cuda, "set_rng_state_all", all_devices)

    def get(self, device):
        assert 0 <= device < self.visible
        return torch.full((5,), 10 + device, dtype=torch.uint8)


def test_rng_state_holds_one_cuda_device_and_restores_on_fewer_visible(monkeypatch):
    cuda = FakeCuda(monkeypatch, visible=4, current=1)
    state = get_rng_state()
    assert torch.equal(state["cuda"], torch.full((5,), 11, dtype=torch.uint8))  # the current device only
    assert torch.equal(get_rng_state(3)["cuda"], torch.full((5,), 13, dtype=torch.uint8))
    assert set_rng_state(state, 2) is None and cuda.restored[-1][1] == 2
    # An older checkpoint: one state per device of the 8 visible when it was written, resumed
    # with 4 visible: the current device's entry is restored, nothing indexes past the 4.
    old = dict(state, cuda=[torch.full((5,), 20 + i, dtype=torch.uint8) for i in range(8)])
    assert set_rng_state(old) is None
    restored, device = cuda.restored[-1]
    assert device == 1 and torch.equal(restored, old["cuda"][1])
    # ... and one written with fewer visible devices than the current index: skipped with a note.
    cuda.current = 3
    n_before = len(cuda.restored)
    note = set_rng_state(dict(state, cuda=old["cuda"][:2]))
    assert "none for device 3" in note and len(cuda.restored) == n_before


# ------------------------------------------------------------------------------ data position


def epoch_perm_prefix(n: int, batch_size: int, seed: int, world_size: int, epoch: int, batches: range) -> list[int]:
    """Indices every rank of a layout consumes in ``batches`` of ``epoch``."""
    out = []
    for b in batches:
        for r in range(world_size):
            out += ResumableBatchSampler(n, batch_size, seed, r, world_size).epoch_batches(epoch)[b]
    return out


@pytest.mark.parametrize("n,batch_size,old_ws,new_ws", [(200, 4, 4, 8), (200, 4, 8, 4), (100, 5, 4, 8), (100, 5, 8, 4),
                                                        (97, 3, 4, 8), (64, 4, 4, 4)])
def test_resume_under_another_world_size_skips_no_sample(n, batch_size, old_ws, new_ws):
    seed = 11
    old_bpe = ResumableBatchSampler(n, batch_size, seed, 0, old_ws).batches_per_epoch
    new_bpe = ResumableBatchSampler(n, batch_size, seed, 0, new_ws).batches_per_epoch
    new_epoch = set(epoch_perm_prefix(n, batch_size, seed, new_ws, 0, range(new_bpe)))
    for saved_batch in range(old_bpe):  # every position the old layout can checkpoint at
        samples_done = saved_batch * batch_size * old_ws  # what the checkpoint stores
        before = epoch_perm_prefix(n, batch_size, seed, old_ws, 0, range(saved_batch))
        assert len(before) == samples_done
        epoch, batch = resume_position(0, samples_done, n, batch_size, new_ws)
        after = epoch_perm_prefix(n, batch_size, seed, new_ws, 0, range(batch, new_bpe)) if epoch == 0 else []
        assert epoch == 0 or batch == 0
        # nothing the resuming layout would train on in this epoch is skipped ...
        assert new_epoch <= set(before) | set(after), (saved_batch, epoch, batch)
        # ... and at most one partial global batch of the new layout is seen twice
        assert len(set(before) & set(after)) < batch_size * new_ws
        if old_ws == new_ws:  # same layout: exactly the saved position (bitwise resume)
            assert (epoch, batch) == (0, saved_batch)


@pytest.mark.parametrize("samples_done", [0, 40, 80, 120])
def test_position_counter_follows_what_the_sampler_yields(samples_done):
    # 100 items, batch 5, saved by 4 ranks (5 batches, 100 samples per epoch), resumed on 8
    # (2 batches of 40 per epoch): 80 samples done is past the new layout's epoch → (1, 0).
    n, bs, ws, seed = 100, 5, 8, 3
    epoch, batch = resume_position(0, samples_done, n, bs, ws)
    if samples_done == 80:
        assert (epoch, batch) == (1, 0)
    for rank in (0, ws - 1):
        sampler = ResumableBatchSampler(n, bs, seed, rank, ws, epoch, batch)
        pos = (epoch, batch)
        it = iter(sampler)
        for _ in range(2 * sampler.batches_per_epoch + 1):
            assert next(it) == sampler.epoch_batches(pos[0])[pos[1]]  # the counter names the next batch
            pos = advance_position(*pos, sampler.batches_per_epoch)
    if samples_done == 80:  # the reviewer's case: after consuming epoch 1's batch 0 → (1, 1)
        assert advance_position(epoch, batch, 2) == (1, 1)


def _rewrite_checkpoint(run: Path, **changes) -> None:
    ckpt = find_checkpoint(run)
    state = load_training_state(ckpt)
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    torch.save(state, ckpt / "state.pt")


def test_trainer_converts_an_old_per_rank_position_of_another_world_size(tmp_path):
    run, c = tmp_path / "run", cfg(max_steps=2)
    Trainer(run, c, Regression(), ToyData(), progress=False).fit()
    # An older checkpoint (no sample_in_epoch) written by 2 ranks at their batch 1: 2 × 4 × 1 = 8
    # samples of epoch 0 done → batch 2 of one process (24 items, batch 4: 6 batches per epoch).
    _rewrite_checkpoint(run, sample_in_epoch=None, world_size=2, epoch=0, batch_in_epoch=1)
    task = Regression()
    tr = Trainer(run, c, task, ToyData(), progress=False)
    assert (tr.epoch, tr.batch_in_epoch) == (0, 2)
    assert "resumes at epoch 0, batch 2" in (run / "train.log").read_text()
    tr.fit(max_steps=3)
    assert task.seen[0] == ResumableBatchSampler(24, 4, c.seed).epoch_batches(0)[2]
    assert (tr.epoch, tr.batch_in_epoch) == (0, 3)
    state = load_training_state(find_checkpoint(run))
    assert (state["epoch"], state["batch_in_epoch"], state["sample_in_epoch"]) == (0, 3, 12)


def test_trainer_position_past_the_layouts_epoch_starts_the_next_one(tmp_path):
    run, c = tmp_path / "run", cfg(max_steps=1)
    Trainer(run, c, Regression(), ToyData(), progress=False).fit()
    _rewrite_checkpoint(run, sample_in_epoch=24, epoch=0, batch_in_epoch=0)  # the whole epoch done
    task = Regression()
    tr = Trainer(run, c, task, ToyData(), progress=False)
    assert (tr.epoch, tr.batch_in_epoch) == (1, 0)
    tr.fit(max_steps=2)
    assert task.seen == [ResumableBatchSampler(24, 4, c.seed).epoch_batches(1)[0]]
    assert (tr.epoch, tr.batch_in_epoch) == (1, 1)  # not (1, 0): the counter matches the data


# ------------------------------------------------------------------------------ stop before samples


def test_stop_on_a_sample_step_writes_the_checkpoint_and_no_sample(tmp_path):
    run = tmp_path / "run"
    task = Regression(interrupt_at=2)  # SIGINT during step index 2 → stop after step 3
    res = Trainer(run, cfg(max_steps=10, sample_every=3), task, ToyData(), progress=False).fit()
    assert res.interrupted and res.step == 3
    assert load_training_state(find_checkpoint(run))["step"] == 3
    assert task.sampled == [] and not (run / "samples" / "step0003.txt").exists()
    assert "interrupted: stopped after step 3" in (run / "train.log").read_text()

    # the resume draws the skipped samples first, as the uninterrupted run would have
    again = Regression()
    res = Trainer(run, cfg(max_steps=4, sample_every=3), again, ToyData(), progress=False).fit()
    assert res.step == 4 and [step for step, _ in again.sampled] == [3, 4]
    assert not (run / "samples" / ".pending_step").exists()
    assert "drawing the samples of step 3" in (run / "train.log").read_text()


class FailingSample(Regression):
    def sample(self, modules, step, out_dir):
        raise RuntimeError("sampler crashed")


def test_checkpoint_is_written_before_samples(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="sampler crashed"):
        Trainer(run, cfg(max_steps=10, sample_every=4, checkpoint_every=4), FailingSample(), ToyData(), progress=False).fit()
    assert load_training_state(find_checkpoint(run))["step"] == 4


# ------------------------------------------------------------------------------ export on rank 0


def test_other_ranks_wait_for_the_new_export_on_the_file_system(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "meta.json").write_text("{}")  # an export of an earlier session
    previous = _export_identity(export)
    assert previous is not None

    def rank0_writes():
        time.sleep(0.3)
        tmp = tmp_path / ".export.tmp"
        tmp.mkdir()
        (tmp / "meta.json").write_text('{"new": true}')
        replace_dir_atomically(tmp, export)

    writer = threading.Thread(target=rank0_writes)
    t0 = time.monotonic()
    writer.start()
    _wait_for_export(export, previous, poll_s=0.02)
    writer.join()
    assert time.monotonic() - t0 >= 0.25 and (export / "meta.json").read_text() == '{"new": true}'
