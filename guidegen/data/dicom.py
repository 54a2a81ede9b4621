"""Read a DICOM CT series (one folder) into an (X, Y, Z) HU array with a RAS affine.

pydicom does the work so every step is explicit and checked: keep the files of the one series
in the folder, sort the slices along the slice normal by ``ImagePositionPatient``, apply each
slice's ``RescaleSlope`` / ``RescaleIntercept`` (they may differ per slice), check that the
slices are evenly spaced (a gap means a missing slice), and build the affine from
``ImageOrientationPatient``, ``PixelSpacing`` and the positions. DICOM's patient frame is LPS;
the affine is converted to RAS and the array reoriented to the closest RAS+ axes, like
:func:`guidegen.io.load_nifti` does for NIfTI.

The writer :func:`write_dicom_series` (used by the tests and useful for checking a pipeline)
stores HU as signed 16-bit ``HU + 1024`` with RescaleIntercept −1024, as many scanners do.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from guidegen.errors import GuideGenError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def to_closest_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip an (I, J, K) array so its axes are closest to RAS+; returns (array, affine)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def looks_like_dicom_folder(folder: Path) -> bool:
    """True when ``folder`` holds at least one file with the DICOM preamble (``DICM`` at 128)."""
    for p in _dicom_files(folder)[:20]:
        try:
            with open(p, "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


# CT Image Storage and Enhanced CT Image Storage
CT_IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def _sop_class(ds) -> str:
    """The SOP class UID of a dataset: its file meta's, else its own (``""`` when neither says)."""
    meta = getattr(ds, "file_meta", None)
    return str((meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID", "") or "")


def _has_dicom_preamble(path: Path) -> bool:
    """Whether ``path`` starts as a DICOM Part 10 file does (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom_series(folder: str | os.PathLike, *, spacing_tol: float = 0.01) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the CT series in ``folder``; return ``(hu (X, Y, Z) float32, RAS affine 4x4, info)``.

    ``info`` has ``n_slices``, ``series_uid`` and ``rescaled`` (whether any slice carried a
    rescale slope/intercept). Raises :class:`GuideGenError` naming the folder for: no DICOM
    files, several series, a single slice (2D), mixed orientations or matrix sizes, and
    uneven slice spacing (relative tolerance ``spacing_tol``).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    headers = []
    for p in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
            if _has_dicom_preamble(p):  # a DICOM file that fails to parse: dropping it would lose a slice
                raise GuideGenError(f"{p}: DICOM file cannot be read ({type(exc).__name__}); truncated or corrupt?") from None
            continue  # stray non-DICOM files (notes, thumbnails) are ignored
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            if _sop_class(ds) in CT_IMAGE_SOP_CLASSES:  # a CT slice cut short, not a DICOMDIR or report
                raise GuideGenError(f"{p}: CT image file without pixel data or position; truncated or corrupt?")
            continue
        headers.append((p, ds))
    if not headers:
        raise GuideGenError(f"{folder}: no DICOM image files with pixel data and ImagePositionPatient")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise GuideGenError(f"{folder}: holds {len(series)} DICOM series; put one series per folder")
    if len(headers) < 2:
        raise GuideGenError(f"{folder}: a single DICOM slice is a 2D image; expected a 3D series")

    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    if np.abs(iops - iops[0]).max() > 1e-4:
        raise GuideGenError(f"{folder}: slices have different ImageOrientationPatient")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(shapes) > 1:
        raise GuideGenError(f"{folder}: slices have different matrix sizes {sorted(shapes)}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]  # row_dir: along a row (column index grows)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 1e-6):
        raise GuideGenError(f"{folder}: two slices share a position (duplicate slices?)")
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.abs(gaps - gaps.mean()).max() > spacing_tol * gaps.mean() + 1e-4:
        raise GuideGenError(
            f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); missing slices?"
        )

    slices, rescaled = [], False
    for p, ds in headers:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # compressed data without a decoder, truncated files
            raise GuideGenError(f"{p}: cannot decode pixel data ({type(exc).__name__})") from None
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            rescaled = True
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(pixels.T * slope + intercept)  # (rows, cols) → (cols = i, rows = j)
    volume = np.stack(slices, axis=-1)  # (I, J, K)

    row_spacing, col_spacing = (float(v) for v in headers[0][1].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i (column index) moves along the row direction
    lps[:3, 1] = col_dir * row_spacing  # j (row index) moves along the column direction
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    hu, affine = to_closest_ras(volume, _LPS_TO_RAS @ lps)
    info = {"n_slices": len(headers), "series_uid": next(iter(series)), "rescaled": rescaled}
    return hu.astype(np.float32), affine, info


def write_dicom_series(folder: str | os.PathLike, hu: np.ndarray, affine: np.ndarray, *, series_uid: str | None = None, patient_id: str = "anon") -> list[Path]:
    """Write an (X, Y, Z) HU volume with a 4x4 (RAS) ``affine`` as one CT slice file per z.

    Pixels are stored signed 16-bit as ``HU + 1024`` (RescaleIntercept −1024), so HU in
    [−33792, 31743] round-trip exactly (after rounding to integers). File names are random-ish (not in slice order) on purpose so readers
    must sort by position.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    di, dj = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / di, lps[:3, 1] / dj
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    stored = np.clip(np.rint(np.asarray(hu, dtype=np.float64)) + 1024, -32768, 32767).astype(np.int16)
    nx, ny, nz = stored.shape
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [f"{dj:.6f}", f"{di:.6f}"]  # [between rows, between columns]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.6f}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"IM{(k * 7919) % 100003:06d}_{k}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
