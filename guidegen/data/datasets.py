"""PyTorch datasets for the three stages, reading the dataset layout through the grid cache.

Items are dicts (default-collatable):
- ``case``: str; ``text``: str (the report); ``findings_json``: str (JSON of the findings)
- ``labels``: (X, Y, Z) int64 label ids on the training grid
- ``ct``: (1, X, Y, Z) float32 HU (only for :class:`CTLabelDataset`)
- ``spacing``: (3,) float32 mm of the training grid for this case
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from guidegen.data.cache import PreprocessCache, PreprocessConfig, preprocess_case
from guidegen.data.layout import DatasetReader
from guidegen.errors import GuideGenError


def cache_sources(reader: DatasetReader, case: str, with_ct: bool) -> list[Path]:
    """The files a grid-cache entry of ``case`` is computed from, whose size and mtime it keeps
    (:func:`guidegen.data.cache.source_stamp`): the label map, and the CT when the entry holds it.
    One rule for the datasets that read the cache and ``guidegen prepare``, which writes it."""
    return [reader.labels_path(case)] + ([reader.ct_path(case)] if with_ct else [])


class GridCaseDataset(Dataset):
    """Cases of a dataset directory resized to ``grid`` (cached under ``DATASET/cache``)."""

    def __init__(self, root: str | Path, grid: tuple[int, int, int], *, with_ct: bool, cases: list[str] | None = None, margin_voxels: int = 2):
        self.reader = DatasetReader(root)
        self.cases = list(cases) if cases is not None else self.reader.case_ids()
        if not self.cases:
            raise GuideGenError(f"{root}: dataset has no complete cases")
        self.with_ct = with_ct
        if with_ct:
            missing = [c for c in self.cases if not self.reader.ct_path(c).is_file()]
            if missing:
                raise GuideGenError(f"{root}: {len(missing)} case(s) have no CT (first: {missing[0]}); this stage needs CT + labels")
        cfg = PreprocessConfig(grid=tuple(grid), margin_voxels=margin_voxels, label_set=self.reader.label_set.name, with_ct=with_ct)
        self.cache = PreprocessCache(self.reader.root, cfg)
        self.grid = cfg.grid

    def __len__(self) -> int:
        return len(self.cases)

    def build_cache(self, progress: bool = True, *, rank: int = 0, world_size: int = 1, barrier=None) -> None:
        """Preprocess every case not cached yet (with a progress bar).

        Sharded over ``world_size`` processes: this one (``rank``) builds the stale cases at
        positions ``i`` of :attr:`cases` with ``i % world_size == rank``, then calls ``barrier`` (a
        collective every process reaches); cases still stale afterwards (a dataset directory the
        processes do not share) are built here. Entries are written atomically.
        """
        def stale(positions: bool) -> list[str]:
            return [c for i, c in enumerate(self.cases)
                    if (not positions or i % world_size == rank) and not self.cache.is_fresh(c, self.sources(c))]

        if world_size > 1:
            for case in tqdm(stale(True), desc=f"caching {self.grid}", disable=not progress):
                self._item(case)
            if barrier is not None:
                barrier()
        todo = stale(False)
        for case in tqdm(todo, desc=f"caching {self.grid}", disable=not progress or not todo):
            self._item(case)

    def sources(self, case: str) -> list[Path]:
        """The files a cached item of ``case`` is computed from (its label map, and CT if used)."""
        return cache_sources(self.reader, case, self.with_ct)

    def _item(self, case: str) -> dict:
        item = self.cache.load(case, self.sources(case))
        if item is None:
            rec = self.reader.load_case(case, with_ct=self.with_ct)
            item = preprocess_case(rec.labels, rec.ct, rec.affine, self.cache.cfg, self.reader.label_set)
            self.cache.store(case, item, self.sources(case))
        return item

    def spacing_of(self, case: str) -> np.ndarray:
        """(3,) voxel spacing in mm of ``case`` on the grid, read alone from its cache entry (not
        the volumes: every rank reads it for every case at start-up)."""
        if not self.cache.is_fresh(case, self.sources(case)):
            self._item(case)
        with np.load(self.cache.path(case)) as z:
            return np.asarray(z["spacing_mm"], dtype=np.float64)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        item = self._item(case)
        rep = self.reader.report(case)
        out = {
            "case": case,
            "text": rep.get("text") or "",
            "findings_json": json.dumps(rep.get("findings")),
            "labels": torch.from_numpy(item["labels"].astype(np.int64)),
            "spacing": torch.from_numpy(np.asarray(item["spacing_mm"], dtype=np.float32)),
        }
        if self.with_ct:
            out["ct"] = torch.from_numpy(np.asarray(item["ct"], dtype=np.float32))[None]
        return out


class LabelMapDataset(GridCaseDataset):
    """Stage 1 (TCSS): label maps + report text."""

    def __init__(self, root: str | Path, grid: tuple[int, int, int], **kw):
        super().__init__(root, grid, with_ct=False, **kw)


class CTLabelDataset(GridCaseDataset):
    """Stage 2 (autoencoder) and the source of stage 3 latents: CT (HU) + label maps + text."""

    def __init__(self, root: str | Path, grid: tuple[int, int, int], **kw):
        super().__init__(root, grid, with_ct=True, **kw)
