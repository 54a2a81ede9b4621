"""The evaluation segmenter (models/segmenter.py): it learns a trivial map, and its training shows progress when asked."""

from __future__ import annotations

import numpy as np

from guidegen.models.segmenter import SegmenterConfig, build_segmenter, segment, train_segmenter


def _toy(n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8, 8) CT in [-1, 1] whose bright half is class 1."""
    ct = -np.ones((n, 8, 8, 8), dtype=np.float32)
    ct[:, 4:] = 1.0
    return ct, (ct > 0).astype(np.int64)


def test_training_fits_a_two_class_toy_and_segment_returns_ids():
    ct, labels = _toy()
    cfg = SegmenterConfig(channels=(4, 8), steps=60, lr=1e-2)
    net = build_segmenter(2, cfg)
    losses = train_segmenter(net, ct, labels, cfg)
    assert len(losses) == 60 and np.mean(losses[-5:]) < np.mean(losses[:5])
    pred = segment(net, ct)
    assert pred.shape == (2, 8, 8, 8) and pred.dtype == np.uint8
    assert (pred == labels).mean() > 0.9


def test_progress_bar_only_when_asked(capsys):
    ct, labels = _toy()
    cfg = SegmenterConfig(channels=(4, 8), steps=3)
    train_segmenter(build_segmenter(2, cfg), ct, labels, cfg)
    assert capsys.readouterr().err == ""
    train_segmenter(build_segmenter(2, cfg), ct, labels, cfg, progress="train segmenter_real")
    err = capsys.readouterr().err
    assert "train segmenter_real" in err and "3/3" in err
