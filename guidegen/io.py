"""File I/O shared by every stage: atomic writes and NIfTI read/write in RAS orientation.

Every file this project writes goes through :func:`atomic_write` so that an interrupted run
never leaves a half-written file under its final name: data is written to a temporary file in
the same directory and moved into place with ``os.replace`` (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from guidegen.errors import GuideGenError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps the final suffixes (``.nii.gz`` etc.) so that writers which pick
    the format from the file name (nibabel, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.removesuffix(suffix)}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether a file name ends in ``.nii`` or ``.nii.gz``, in any case (scanners and Windows
    tools write ``.NII.GZ``; nibabel reads them alike)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``name`` without its ``.nii`` / ``.nii.gz`` suffix (in any case)."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type | np.dtype) -> None:
    """Write ``array`` (X, Y, Z) with a 4x4 ``affine`` atomically as ``dtype``.

    The header is fixed to plain values (no scaling) so int16 HU / uint8 labels read back
    exactly; the sform and qform both carry the affine.
    """
    arr = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(arr.dtype, np.integer):
        arr = np.rint(arr)
    img = nib.Nifti1Image(arr.astype(dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units("mm", "sec")  # readers that do not assume mm (the NIfTI default is "unknown")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))


def load_nifti(path: str | os.PathLike, *, reorient_to_ras: bool = True, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI file; return ``(array (X, Y, Z), affine 4x4)``, by default in RAS.

    Raises :class:`GuideGenError` with the file name for anything that is not a readable 3D
    NIfTI volume (missing, not NIfTI, corrupt, 2D, 4D with more than one frame).
    """
    path = Path(path)
    if path.is_dir():
        raise GuideGenError(f"{path}: is a directory; expected a NIfTI file (.nii or .nii.gz)")
    if not path.is_file():
        raise GuideGenError(f"{path}: file not found")
    if not is_nifti(path):
        raise GuideGenError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        if reorient_to_ras:
            img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise GuideGenError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt file'})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GuideGenError(f"{path}: image is {data.ndim}D (shape {tuple(data.shape)}); expected a 3D volume")
    if dtype is not None:
        data = data.astype(dtype)
    return np.asarray(data), np.asarray(img.affine, dtype=np.float64)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array in RAS axis order, its affine, the orientation that undoes it)`` of an (X, Y, Z)
    volume whose axes follow ``affine`` (LPS, oblique, permuted ...): the voxels are flipped and
    permuted only, never resampled, so :func:`from_ras` restores the input exactly."""
    native = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    ras = nib.orientations.axcodes2ornt("RAS")
    forward = nib.orientations.ornt_transform(native, ras)
    out = nib.orientations.apply_orientation(array, forward)
    out_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(forward, array.shape)
    return np.ascontiguousarray(out), out_affine, nib.orientations.ornt_transform(ras, native)


def from_ras(array: np.ndarray, back: np.ndarray) -> np.ndarray:
    """An array on the RAS grid of :func:`to_ras` back on the input's axes (``back`` from it)."""
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def ras_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Diagonal RAS+ affine: array axes 0, 1, 2 increase towards patient Right, Anterior, Superior."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = origin
    return aff
