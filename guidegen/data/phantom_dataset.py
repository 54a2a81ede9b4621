"""Write a procedural phantom dataset (``guidegen phantom``) in the dataset layout."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from guidegen.data.layout import CaseRecord, DatasetReader, DatasetWriter, check_output_root, write_case_preview
from guidegen.errors import GuideGenError
from guidegen.labels import load_label_set

PHANTOM_SOURCE = "guidegen procedural phantom"


def phantom_digest() -> str:
    """12 hex digits identifying what the phantom renders: a hash of the sources of its geometry,
    HU and report code and of the label set it writes.

    Recorded as ``phantom_digest`` in every phantom dataset's ``dataset.json``. *Why*: a phantom
    change (say, new lesion HU) leaves the seeds, grid and case ids as they were, so a set written
    before it looks current; benchmarks that keep a reference set between runs compare this digest
    and re-render a stale set instead of scoring against the old truth. Any edit of those sources,
    comments included, changes it: a spurious re-render costs a minute, a stale set a wrong number.
    """
    from importlib import resources

    from guidegen.data import phantom, phantom_reports

    h = hashlib.sha256()
    for module in (phantom, phantom_reports):
        h.update(Path(module.__file__).read_bytes())
    h.update((resources.files("guidegen") / "labelsets" / f"{phantom.LABEL_SET}.yaml").read_bytes())
    return h.hexdigest()[:12]


def phantom_case_id(seed: int) -> str:
    return f"phantom_{seed:06d}"


def render_record(seed: int, grid: tuple[int, int, int]) -> CaseRecord:
    """Render one phantom case (seeded) as a :class:`CaseRecord`."""
    from guidegen.data.phantom import render_phantom

    t0 = time.perf_counter()
    case = render_phantom(seed, grid)
    seconds = time.perf_counter() - t0
    return CaseRecord(
        case=phantom_case_id(seed),
        labels=case.labels,
        affine=case.affine,
        ct=case.ct,
        text=case.text,
        findings=case.findings,
        meta={"source": "phantom", "seed": seed, "grid": list(grid), "render_seconds": round(seconds, 3)},
    )


def _render_with_preview(seed: int, grid: tuple[int, int, int], preview_root: str | None, label_set: str) -> CaseRecord:
    """Worker: render one case and, when ``preview_root`` is given, write its preview PNG there."""
    record = render_record(seed, grid)
    if preview_root is not None:
        write_case_preview(preview_root, record, load_label_set(label_set))
    return record


def write_phantom_dataset(
    out: str | Path,
    *,
    n: int,
    grid: tuple[int, int, int],
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    previews: bool = True,
    progress: bool = True,
) -> Path:
    """Render ``n`` cases with seeds ``seed..seed+n-1`` into ``out``; returns ``out``.

    Rendering (and the preview PNG) runs in ``workers`` processes; the volumes, meta and report
    are written in this process, one complete case at a time, so an interrupted run leaves only
    complete cases behind (a preview without its meta belongs to no case and is rewritten).
    A re-run into a phantom set of the same grid, first seed and phantom version resumes it:
    its complete cases are kept, the missing ones rendered (a larger ``n`` extends the set).
    """
    info = {"source": PHANTOM_SOURCE, "grid": list(grid), "seeds": [seed, seed + n - 1], "phantom_digest": phantom_digest()}
    mode = "overwrite" if overwrite else check_output_root(out, overwrite_option=True)
    if mode == "resume":
        check_resumable_phantom(Path(out), info)
    writer = DatasetWriter(out, name="phantom", mode=mode, info=info)
    seeds = [s for s in range(seed, seed + n) if not writer.has_case(phantom_case_id(s))]
    if seeds and mode == "resume":
        writer.mark_incomplete()
    with tqdm(total=n, initial=n - len(seeds), desc="phantom cases", unit="case", disable=not progress) as bar:
        if workers == 1:
            for s in seeds:
                writer.write_case(render_record(s, grid), preview=previews)
                bar.update()
        else:
            preview_root = str(writer.root) if previews else None
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for record in pool.map(_render_with_preview, seeds, [grid] * len(seeds), [preview_root] * len(seeds),
                                       [writer.label_set.name] * len(seeds)):
                    writer.write_case(record, preview=False)
                    bar.update()
    writer.finalize()
    return Path(out)


def check_resumable_phantom(out: Path, info: dict) -> None:
    """Raise unless the dataset in ``out`` is a phantom set that ``info``'s run can resume: the
    same grid, first seed and phantom version, and no case beyond the requested seeds."""
    have = DatasetReader(out).info
    if have.get("source") != PHANTOM_SOURCE:
        raise GuideGenError(f"{out}: holds a dataset that is not a guidegen phantom (use --overwrite to replace it, or choose another --out)")
    differ = [f"{key}: {have.get(key)} -> {info[key]}" for key in ("grid", "phantom_digest") if have.get(key) != info[key]]
    old_seeds = have.get("seeds") or [None, None]
    if old_seeds[0] != info["seeds"][0]:
        differ.append(f"first seed: {old_seeds[0]} -> {info['seeds'][0]}")
    elif old_seeds[1] is not None and old_seeds[1] > info["seeds"][1]:
        differ.append(f"--n: {old_seeds[1] - old_seeds[0] + 1} -> {info['seeds'][1] - info['seeds'][0] + 1} (fewer cases)")
    if differ:
        raise GuideGenError(f"{out}: holds a phantom set of other settings ({'; '.join(differ)}); "
                            "use --overwrite to replace it, or choose another --out")
