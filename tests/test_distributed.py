"""Two CPU processes under torchrun: sharded batch generation and DDP (gloo) training of each stage.

The file doubles as the torchrun worker of the training test:
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_distributed.py train DATA OUT``
trains tcss, autoencoder and ldm for two steps each through ``run_training`` and writes, per
rank and stage, the hash of the weights before and after ``fit`` to ``OUT/<stage>.rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from helpers_tiny import build_tiny_checkpoints, write_tiny_config, write_tiny_data  # noqa: E402

STAGES = ("tcss", "autoencoder", "ldm")
PROMPTS = ('{"id": "a", "prompt": "liver mass 3 cm"}\n'
           '{"id": "b", "prompt": "55 yo woman, normal CT"}\n'
           '{"id": "c", "prompt": "70-year-old man, 2 cm nodule in the right lung"}\n')
CASES = [f"{p}_s{k}" for p in "abc" for k in range(2)]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def tcss_root(tmp_path_factory):
    """Checkpoint root with only tcss/ (label-only generation)."""
    return build_tiny_checkpoints(tmp_path_factory.mktemp("dist_gen"), stages=("tcss",))


def _generate(ckpt: Path, prompts: Path, out: Path) -> subprocess.CompletedProcess:
    # --num-samples, not --n: torchrun's own parser takes --n as an ambiguous prefix of its options
    return torchrun("-m", "guidegen", "generate", "--prompts", prompts, "--num-samples", 2, "--labels-only", "--checkpoint", ckpt, "--out", out)


def _report_cases(out: Path) -> list[str]:
    return [json.loads(line)["case"] for line in (out / "reports.jsonl").read_text().splitlines()]


def test_sharded_generation_writes_each_case_once_and_resumes(tcss_root, tmp_path):
    from guidegen.data.layout import DatasetReader
    from guidegen.pipeline import read_prompts, sample_seed

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    res = _generate(tcss_root, prompts, out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # each rank took its 3 of the 6 samples (rank r: every 2nd sample from r)
    for rank in (0, 1):
        assert re.search(rf"generate \(rank {rank}\): 100%.*\b3/3\b", res.stderr), res.stderr[-2000:]
    reader = DatasetReader(out)
    assert reader.case_ids() == CASES
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{c}.nii.gz" for c in CASES]  # no temp files left
    assert sorted(_report_cases(out)) == CASES  # exactly once each, after both ranks appended
    info = json.loads((out / "dataset.json").read_text())
    assert info["status"] == "complete" and info["num_cases"] == len(CASES)
    # seeds follow the prompt id and sample index, not the rank that drew it
    items = {it.id: it for it in read_prompts(prompts)}
    assert [reader.meta(c)["seed"] for c in CASES] == [sample_seed(0, items[c.split("_s")[0]], int(c.split("_s")[1])) for c in CASES]
    assert reader.load_case("a_s0").labels.shape == (16, 16, 24)

    # re-run after a "crash" that lost one case of each rank: only those two are redone
    before = {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in CASES}
    for lost in ("a_s1", "b_s0"):
        (out / "meta" / f"{lost}.json").unlink()
    res = _generate(tcss_root, prompts, out)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    after = {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in CASES}
    assert [c for c in CASES if after[c] != before[c]] == ["a_s1", "b_s0"]
    assert sorted(_report_cases(out)) == CASES
    assert json.loads((out / "dataset.json").read_text())["status"] == "complete"


def test_rank_outside_world_is_one_line_error(tmp_path):
    from guidegen.errors import GuideGenError
    from guidegen.pipeline import PromptItem, generate_dataset

    with pytest.raises(GuideGenError, match="rank 2 is outside world size 2"):
        generate_dataset(None, [PromptItem("a", "liver mass")], tmp_path / "o", rank=2, world_size=2)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ training


def test_ddp_training_of_every_stage_keeps_replicas_identical(tmp_path):
    data = write_tiny_data(tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    res = torchrun(__file__, "train", data, out, timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in STAGES:
        info = [json.loads((out / f"{stage}.rank{r}.json").read_text()) for r in (0, 1)]
        assert [i["world_size"] for i in info] == [2, 2] and [i["step"] for i in info] == [2, 2]
        assert info[0]["before"] == info[1]["before"], f"{stage}: ranks started from different weights"
        assert info[0]["after"] != info[0]["before"], f"{stage}: training did not change the weights"
        assert info[0]["after"] == info[1]["after"], f"{stage}: ranks diverged"
        assert info[0]["ema"] == info[1]["ema"]
        meta = json.loads((out / f"run_{stage}" / "checkpoint" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["written_by_rank"] == 0 and meta["step"] == 2
        export = json.loads((out / f"run_{stage}" / "export" / "meta.json").read_text())
        assert export["stage"] == stage and export["train_steps"] == 2
    assert not list(out.glob("run_*/.export.tmp-*"))


# ------------------------------------------------------------------------------ worker


def _state_hash(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker_train(data: str, out: str) -> None:
    import torch

    from guidegen.training import trainer as trainer_mod
    from guidegen.training.run import run_training

    out_dir = Path(out)
    rank = int(os.environ["RANK"])
    original_fit = trainer_mod.Trainer.fit
    current = {}

    def fit_and_record(self, *a, **kw):
        before = _state_hash(self.modules["model"])
        result = original_fit(self, *a, **kw)
        info = {"rank": self.rank, "world_size": self.world_size, "step": self.step, "before": before,
                "after": _state_hash(self.modules["model"]), "ema": _state_hash(self.ema["model"].module)}
        (out_dir / f"{current['stage']}.rank{rank}.json").write_text(json.dumps(info))
        return result

    trainer_mod.Trainer.fit = fit_and_record
    cfg = write_tiny_config(out_dir / f"tiny.rank{rank}.yaml")
    for stage in STAGES:
        current["stage"] = stage
        if stage == "ldm":  # the latents of the autoencoder trained just before (exported by rank 0)
            cfg = write_tiny_config(out_dir / f"tiny_ldm.rank{rank}.yaml",
                                    autoencoder_checkpoint=str(out_dir / "run_autoencoder" / "export"))
        run_training(stage, cfg, data, out_dir / f"run_{stage}", max_steps=2, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        _worker_train(sys.argv[2], sys.argv[3])
