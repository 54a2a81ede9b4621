"""Procedural chest-to-pelvis torso phantom: paired label map, CT in HU and a report (DESIGN §3).

The anatomy is a set of continuous shapes in millimetres (superquadrics, tubes along splines, a
parametric rib cage, a two-dome diaphragm) laid out in a *reference* torso of 540 mm height whose
axes are then scaled per case. Shapes are evaluated only inside their bounding boxes, so a case
renders at any grid from 16 to 256 voxels per axis in well under a second at 64³.

Coordinates are RAS+ in mm: x → patient Right, y → Anterior, z → Superior. The field of view is
the torso box (skin to skin laterally and antero-posteriorly, pelvic floor to lung apex); the grid
maps voxel centres over it, so spacing = extent / grid (anisotropic).

Painting order encodes label priority: a later shape overwrites an earlier one (optionally only
where the current label is in a ``where`` set). Tissues that are not classes of the label set
(muscle, pelvic bone, airway, other vessels, gland) get private ids >= 100 while painting and
become ``body`` (21) at the end; they still carry their own HU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from scipy import ndimage

from guidegen.errors import GuideGenError
from guidegen.labels import load_label_set

# --------------------------------------------------------------------------------------------
# Label ids (guidegen22) and private tissue ids
# --------------------------------------------------------------------------------------------
LABEL_SET = "guidegen22"  # the label set every phantom case is written in
_LS = load_label_set(LABEL_SET)
L = {name: _LS.id_of(name) for name in _LS.names}
BODY, TUMOR = L["body"], L["tumor"]
MUSCLE, BONE, AIRWAY, SOFT, VESSEL = 100, 101, 102, 103, 104  # all become BODY in the output
PAIRED = ("kidney", "lung", "adrenal_gland")
PHASES = ("non_contrast", "arterial", "portal_venous")
REF_HEIGHT = 540.0  # reference torso height (mm), pelvic floor to lung apex

# Mean HU per tissue and phase: (non_contrast, arterial, portal_venous).
HU = {
    "fat": (-100, -100, -100), "muscle": (50, 55, 60), "soft": (40, 55, 70),
    "liver": (55, 70, 110), "spleen": (45, 120, 120), "kidney_cortex": (30, 200, 170),
    "kidney_medulla": (30, 80, 160), "pancreas": (40, 110, 90), "adrenal": (30, 60, 70),
    "bowel_wall": (40, 100, 90), "bowel_fluid": (15, 15, 15), "stomach_fluid": (10, 10, 10),
    "colon_content": (-40, -40, -40), "bladder": (10, 10, 10), "gallbladder": (10, 10, 10),
    "aorta": (40, 300, 160), "ivc": (40, 70, 130), "portal": (40, 90, 180), "vessel_a": (40, 280, 150),
    "vessel_v": (40, 70, 130), "heart_left": (40, 300, 150), "heart_right": (40, 200, 150),
    "myocardium": (45, 100, 110), "esophagus": (40, 60, 70), "lung": (-860, -860, -860),
    "uterus": (45, 90, 100), "prostate": (40, 60, 70), "gland": (10, 20, 20), "cartilage": (110, 110, 110),
}
# Tumour HU relative to its organ's mean: hypo- (negative) or hyper-dense (positive) by site/phase.
TUMOR_DELTA = {
    "liver": (-20, 45, -45), "kidney": (5, -40, -70), "pancreas": (-10, -50, -40), "spleen": (-10, -50, -50),
    "lung": (None, None, None), "adrenal_gland": (-5, 20, 20), "colon": (0, 20, 20), "stomach": (0, 20, 20),
}
# Masses inside a blood pool (tumour thrombus in the IVC or portal vein, intraluminal aortic and
# intracardiac masses) show as filling defects: soft tissue that enhances far less than the
# opacified lumen, so their HU follows the phase, not the lumen (non-contrast, arterial, portal).
BLOOD_POOL_SITES = ("aorta", "inferior_vena_cava", "portal_splenic_vein", "heart")
BLOOD_POOL_MASS_HU = (40, 65, 80)
TUMOR_WEIGHTS = {"liver": 5, "lung": 5, "kidney": 4, "pancreas": 3, "colon": 3}  # all others weigh 0.35
TUMOR_MAX_MM = {"adrenal_gland": 50, "gallbladder": 35, "esophagus": 40, "portal_splenic_vein": 20,
                "inferior_vena_cava": 22, "aorta": 20, "rib": 30, "vertebrae": 35, "duodenum": 35,
                "urinary_bladder": 45, "heart": 35, "small_bowel": 35}


# --------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------
@dataclass
class TumorSpec:
    site: str  # organ name from the label set, e.g. "liver", "kidney", "lung", "colon", "pancreas"
    size_mm: float  # equivalent-sphere diameter in mm
    side: str | None = None  # "left"/"right" for paired organs (kidney, lung, adrenal_gland), else None


@dataclass
class PhantomSpec:
    """Everything that defines one case's anatomy and report (texture and noise come from the seed)."""

    sex: str  # "male" | "female"
    age: int
    habitus: float  # 0 thin .. 1 obese (subcutaneous and visceral fat)
    phase: str  # "non_contrast" | "arterial" | "portal_venous"
    tumors: list[TumorSpec]
    smoking: bool | None
    t_stage: str | None
    n_stage: str | None
    m_stage: str | None
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # LR, AP, SI scale of the lean frame
    breathing: float = 0.5  # 0 full expiration (diaphragm high) .. 1 deep inspiration (low)
    organ_scale: dict[str, float] = field(default_factory=dict)  # per-organ size factor (~0.85..1.15)
    organ_shift: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # mm offsets
    bladder_fill: float = 0.6  # 0 empty .. 1 full
    bowel_gas: float = 0.5  # amount of colonic/gastric gas


@dataclass
class PhantomCase:
    labels: np.ndarray  # (X, Y, Z) uint8, label-set ids 0..21 (20 tumor, 21 body envelope)
    ct: np.ndarray  # (X, Y, Z) int16 HU
    affine: np.ndarray  # (4, 4) RAS, diagonal spacing in mm
    spec: PhantomSpec
    findings: dict  # {"sex","age","tumors":[{"site","side","size_mm"}],"t_stage","n_stage","m_stage","phase","smoking"}
    text: str  # radiology-style report written from the findings
    tissue: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) uint8 fine tissue ids (>=100: muscle, bone, ...)


# --------------------------------------------------------------------------------------------
# Spec sampling and validation
# --------------------------------------------------------------------------------------------
_JITTER_ORGANS = ("liver", "spleen", "kidney", "stomach", "heart", "pancreas", "urinary_bladder", "gallbladder", "lung")


def _stage(tumors: list[TumorSpec], rng: np.random.Generator) -> tuple[str | None, str | None, str | None]:
    """Plausible TNM from the largest tumour (T by size) and the number of organs involved."""
    if not tumors:
        return None, None, None
    size = max(t.size_mm for t in tumors)
    t = "T1" if size <= 20 else "T2" if size <= 40 else "T3" if size <= 55 else "T4"
    if rng.random() < 0.1:
        t = "T4"
    n = str(rng.choice(["N0", "N1", "N2"], p=[0.55, 0.3, 0.15]))
    m = "M1" if len({x.site for x in tumors}) > 1 or rng.random() < 0.1 else "M0"
    return t, n, m


def sample_spec(rng: np.random.Generator, **overrides) -> PhantomSpec:
    """Draw a random realistic case; keyword arguments override any :class:`PhantomSpec` field.

    About 75 % of cases carry 1-3 tumours (10-60 mm, weighted towards liver, lung, kidney,
    pancreas and colon). When ``tumors`` is overridden and the stages are not, the stages are
    re-derived from the given tumours.
    """
    known = {f.name for f in fields(PhantomSpec)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise GuideGenError(f"sample_spec: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    sex = str(rng.choice(["male", "female"]))
    age = int(np.clip(rng.normal(60, 13), 20, 90))
    habitus = float(np.clip(rng.beta(2.2, 2.6), 0, 1))
    phase = str(rng.choice(PHASES, p=[0.25, 0.25, 0.5]))
    organs = _LS.organ_names
    w = np.array([TUMOR_WEIGHTS.get(o, 0.35) for o in organs])
    tumors: list[TumorSpec] = []
    if rng.random() < 0.75:
        for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))):
            site = str(rng.choice(organs, p=w / w.sum()))
            size = float(np.round(rng.uniform(10, min(60, TUMOR_MAX_MM.get(site, 60))), 1))
            side = str(rng.choice(["left", "right"])) if site in PAIRED else None
            tumors.append(TumorSpec(site, size, side))
    t, n, m = _stage(tumors, rng)
    smoking = [None, True, False][int(rng.choice(3, p=[0.4, 0.25, 0.35]))]
    male = sex == "male"
    s = rng.normal(0, 0.035, 3)
    scale = (float(np.clip((1.0 if male else 0.93) + s[0], 0.82, 1.12)),
             float(np.clip((1.0 if male else 0.95) + s[1], 0.82, 1.12)),
             float(np.clip((1.0 if male else 0.93) + s[2], 0.84, 1.1)))
    organ_scale = {o: float(np.clip(rng.normal(1, 0.07), 0.82, 1.18)) for o in _JITTER_ORGANS}
    organ_shift = {o: tuple(float(v) for v in rng.normal(0, 5, 3)) for o in _JITTER_ORGANS}
    spec = PhantomSpec(sex=sex, age=age, habitus=habitus, phase=phase, tumors=tumors, smoking=smoking,
                       t_stage=t, n_stage=n, m_stage=m, scale=scale, breathing=float(rng.uniform(0, 1)),
                       organ_scale=organ_scale, organ_shift=organ_shift,
                       bladder_fill=float(rng.uniform(0.25, 1.0)), bowel_gas=float(rng.uniform(0.1, 1.0)))
    if "tumors" in overrides and not {"t_stage", "n_stage", "m_stage"} & set(overrides):
        overrides["t_stage"], overrides["n_stage"], overrides["m_stage"] = _stage(list(overrides["tumors"]), rng)
    for k, v in overrides.items():
        setattr(spec, k, v)
    return spec


def _check_spec(spec: PhantomSpec) -> None:
    if spec.sex not in ("male", "female"):
        raise GuideGenError(f"phantom spec: sex must be 'male' or 'female', got {spec.sex!r}")
    if spec.phase not in PHASES:
        raise GuideGenError(f"phantom spec: phase must be one of {', '.join(PHASES)}, got {spec.phase!r}")
    if not 0.0 <= float(spec.habitus) <= 1.0:
        raise GuideGenError(f"phantom spec: habitus must be in [0, 1], got {spec.habitus}")
    for t in spec.tumors:
        if t.site not in _LS.organ_names:
            raise GuideGenError(f"phantom spec: unknown tumour site {t.site!r}; use one of {', '.join(_LS.organ_names)}")
        if not 3.0 <= float(t.size_mm) <= 150.0:
            raise GuideGenError(f"phantom spec: tumour size must be 3-150 mm, got {t.size_mm} ({t.site})")
        if t.side not in (None, "left", "right"):
            raise GuideGenError(f"phantom spec: tumour side must be 'left', 'right' or None, got {t.side!r}")


# --------------------------------------------------------------------------------------------
# Canvas: the voxel grid, coordinates and painting
# --------------------------------------------------------------------------------------------
def _where_table(ids) -> np.ndarray:
    table = np.zeros(256, bool)
    table[list(ids)] = True
    return table


class _Canvas:
    """Label + HU volumes over the torso box with voxel-centre coordinates in reference mm."""

    def __init__(self, grid: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray, scale: np.ndarray, phase: int):
        self.shape = tuple(int(g) for g in grid)
        self.spacing = (hi - lo) / np.array(self.shape)  # world mm
        self.lo, self.scale, self.phase = lo, scale, phase
        world = [lo[i] + (np.arange(n) + 0.5) * self.spacing[i] for i, n in enumerate(self.shape)]
        self.axes = [(w / scale[i]).astype(np.float32) for i, w in enumerate(world)]  # reference mm
        self.lab = np.zeros(self.shape, np.uint8)
        self.hu = np.full(self.shape, -1000.0, np.float32)

    def window(self, lo, hi):
        """Index window of the voxels whose centres lie in the reference box [lo, hi], with coords."""
        sl = []
        for a, l0, h0 in zip(self.axes, lo, hi):
            i0, i1 = np.searchsorted(a, l0), np.searchsorted(a, h0, side="right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        x, y, z = (a[s] for a, s in zip(self.axes, sl))
        return tuple(sl), (x[:, None, None], y[None, :, None], z[None, None, :])

    def put(self, sl, mask, label: int, hu, where=None) -> None:
        lab = self.lab[sl]
        if where is not None:
            mask = mask & _where_table(where)[lab]
        lab[mask] = label
        h = self.hu[sl]
        if np.ndim(hu) == 0:
            h[mask] = hu
        else:
            h[mask] = np.broadcast_to(hu, mask.shape)[mask]

    def hu_of(self, name: str) -> float:
        return float(HU[name][self.phase])


def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation (degrees about x, then y, then z); rows of the result are the shape's local axes."""
    a, b, c = np.radians([rx, ry, rz])
    Rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    Ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    Rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (Rz @ Ry @ Rx).T


def _quadric(cv: _Canvas, c, r, rot=None, pz: float = 2.0):
    """Ellipsoid (pz=2) or elliptic cylinder-like superquadric (pz>2) → (sl, mask, rho, coords).

    ``rho`` is the normalized radius (< 1 inside, 0 at the centre) over the window.
    """
    c, r = np.asarray(c, float), np.asarray(r, float)
    M = np.eye(3) if rot is None else np.asarray(rot)
    ext = np.abs(M).T @ r
    w = cv.window(c - ext, c + ext)
    if w is None:
        return None
    sl, (x, y, z) = w
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    u = [(M[k, 0] * dx + M[k, 1] * dy + M[k, 2] * dz) / r[k] for k in range(3)]
    rho = u[0] ** 2 + u[1] ** 2 + (np.abs(u[2]) ** pz if pz != 2 else u[2] ** 2)
    return sl, rho <= 1.0, rho, (x, y, z)


def _spline(ctrl, radii, step: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom curve through control points (N, 3) sampled every ~step mm; radii linear."""
    P = np.asarray(ctrl, float)
    R = np.asarray(radii, float) * np.ones(len(P))
    Pe = np.vstack([2 * P[0] - P[1], P, 2 * P[-1] - P[-2]])
    pts, rad = [], []
    for i in range(len(P) - 1):
        p0, p1, p2, p3 = Pe[i], Pe[i + 1], Pe[i + 2], Pe[i + 3]
        n = max(1, int(math.ceil(np.linalg.norm(p2 - p1) / step)))
        t = (np.arange(n) / n)[:, None]
        seg = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        pts.append(seg)
        rad.append(R[i] + (R[i + 1] - R[i]) * t[:, 0])
    pts.append(P[-1:])
    rad.append(R[-1:])
    return np.vstack(pts), np.concatenate(rad)


def _tube(cv: _Canvas, pts: np.ndarray, rad: np.ndarray):
    """Swept sphere along a polyline → (sl, mask, q, coords); q = distance / local radius."""
    lo = (pts - rad[:, None]).min(0)
    hi = (pts + rad[:, None]).max(0)
    w = cv.window(lo, hi)
    if w is None:
        return None
    sl, (x, y, z) = w
    q = np.full((x.shape[0], y.shape[1], z.shape[2]), np.inf, np.float32)
    xs, ys, zs = x.ravel(), y.ravel(), z.ravel()
    for j in range(len(pts) - 1):
        a, b = pts[j], pts[j + 1]
        ra, rb = rad[j], rad[j + 1]
        rm = max(ra, rb)
        i0, i1 = np.searchsorted(xs, min(a[0], b[0]) - rm), np.searchsorted(xs, max(a[0], b[0]) + rm, "right")
        j0, j1 = np.searchsorted(ys, min(a[1], b[1]) - rm), np.searchsorted(ys, max(a[1], b[1]) + rm, "right")
        k0, k1 = np.searchsorted(zs, min(a[2], b[2]) - rm), np.searchsorted(zs, max(a[2], b[2]) + rm, "right")
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            continue
        X, Y, Z = x[i0:i1] - a[0], y[:, j0:j1] - a[1], z[:, :, k0:k1] - a[2]
        d = b - a
        L2 = float(d @ d) or 1e-6
        t = np.clip((X * d[0] + Y * d[1] + Z * d[2]) / L2, 0, 1)
        dist = np.sqrt((X - t * d[0]) ** 2 + (Y - t * d[1]) ** 2 + (Z - t * d[2]) ** 2)
        sub = q[i0:i1, j0:j1, k0:k1]
        np.minimum(sub, dist / (ra + t * (rb - ra)), out=sub)
    return sl, q <= 1.0, q, (x, y, z)


def _put_shape(cv: _Canvas, shape, label: int, hu, where=None):
    if shape is not None:
        sl, mask, aux, coords = shape
        cv.put(sl, mask, label, hu(aux, coords) if callable(hu) else hu, where)
    return shape


# --------------------------------------------------------------------------------------------
# The reference torso: body frame, spine line and diaphragm (functions of reference mm)
# --------------------------------------------------------------------------------------------
_ZK = np.array([0, 60, 120, 190, 250, 300, 360, 420, 480, 540], float)
_A = np.array([142, 152, 150, 134, 128, 132, 140, 140, 134, 122], float)  # lean frame half-width
_BP = np.array([92, 96, 92, 90, 92, 98, 104, 106, 104, 94], float)  # posterior half-depth
_BA = np.array([92, 96, 96, 100, 102, 102, 104, 106, 102, 86], float)  # anterior half-depth
_SPINE_D = np.array([40, 48, 62, 78, 80, 76, 70, 66, 62, 60], float)  # vertebral-body centre depth from the back


class _Torso:
    """Per-case reference anatomy: frame half-sizes per z, spine line, diaphragm, landmarks."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        sx, sy, _ = spec.scale
        self.fat = 4.0 + 32.0 * spec.habitus  # subcutaneous fat (world mm)
        self.fat_x, self.fat_y = self.fat / sx, self.fat / sy
        self.belly = 30.0 * spec.habitus**1.5  # anterior abdominal protrusion (visceral fat)
        self.female = spec.sex == "female"
        bre = 0.8 - 1.6 * spec.breathing  # diaphragm offset, mm*~25 (inspiration lowers it)
        self.z_dr = 352.0 + 22.0 * bre  # right dome top
        self.z_dl = self.z_dr - 16.0

    # frame ------------------------------------------------------------------------------
    def A(self, z):
        a = np.interp(z, _ZK, _A)
        if self.female:
            a = a * (1 + 0.09 * np.clip((230 - z) / 120, 0, 1) - 0.05 * np.clip((z - 280) / 100, 0, 1))
        return a

    def BP(self, z):
        return np.interp(z, _ZK, _BP)

    def BA(self, z):
        return np.interp(z, _ZK, _BA) + self.belly * np.exp(-(((z - 200) / 90) ** 2))

    def y_spine(self, z):
        return -self.BP(z) + np.interp(z, _ZK, _SPINE_D)

    def rho(self, x, y, z, grow_x=0.0, grow_y=0.0):
        """Superellipse radius of the frame (grown by grow mm; negative shrinks): < 1 inside."""
        a = self.A(z) + grow_x
        b = np.where(y > 0, self.BA(z), self.BP(z)) + grow_y
        front = y > 0
        p = np.where(front, 2.3, 3.2)  # rounder belly, flatter back
        # x's term has no extent along y: raise it to both powers before broadcasting, then pick
        ax = np.abs(x) / a
        return np.where(front, ax**2.3, ax**3.2) + (np.abs(y) / b) ** p

    def diaphragm(self, x, y):
        """Height of the diaphragm surface (two domes, right higher, posterior recesses low)."""
        dy = np.clip((-20 - y) / 70, 0, None)
        dr = self.z_dr - 55 * ((x - 55) / 100) ** 2 - 30 * (y / 100) ** 2 - 35 * dy**2
        dl = self.z_dl - 55 * ((x + 60) / 100) ** 2 - 30 * (y / 100) ** 2 - 35 * dy**2
        return np.maximum(dr, dl)

    # vertebral levels ----------------------------------------------------------------------
    def levels(self) -> list[tuple[str, float, float, float, float]]:
        """(name, z centre, half height, half LR, half AP) for T1..T12, L1..L5 (reference mm)."""
        out = []
        for k in range(1, 13):
            f = (k - 1) / 11
            out.append((f"T{k}", 296.0 + (12 - k) * 22.0, 8.5, 14 + 7 * f, 11.5 + 5 * f))
        for k in range(1, 6):
            out.append((f"L{k}", 268.5 - (k - 1) * 33.0, 12.5, 22 + 1.5 * k, 16 + 0.6 * k))
        return out


# --------------------------------------------------------------------------------------------
# Painting the anatomy
# --------------------------------------------------------------------------------------------
def _body(cv: _Canvas, T: _Torso, rng: np.random.Generator) -> None:
    """Skin outline filled with fat, a muscle wall, then the fat-filled body cavity."""
    full = tuple(slice(None) for _ in range(3))
    x, y, z = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
    outer = T.rho(x, y, z, T.fat_x, T.fat_y) <= 1
    cv.put(full, outer, BODY, cv.hu_of("fat"))
    if T.female:  # breasts: fat with glandular tissue, anterior chest
        for s in (-1, 1):
            c = (s * 72, T.BA(415) - 10, 412)
            r = np.array([55, 35 + 30 * T.spec.habitus, 55]) * (0.85 + 0.25 * T.spec.habitus)
            _put_shape(cv, _quadric(cv, c, r), BODY, cv.hu_of("fat"))
            _put_shape(cv, _quadric(cv, (s * 72, T.BA(415) + 5, 412), r * 0.45), SOFT, cv.hu_of("gland"))
    wall = T.rho(x, y, z) <= 1
    cv.put(full, wall, MUSCLE, cv.hu_of("muscle"))
    cavity = T.rho(x, y, z, -12.0, -12.0) <= 1
    cv.put(full, cavity, BODY, cv.hu_of("fat") + 10)


def _musculoskeletal_soft(cv: _Canvas, T: _Torso) -> None:
    """Paraspinal, psoas and gluteal muscles, pelvic bones, sternum, spinal canal, airway, pelvic organs."""
    zz = np.linspace(0, 545, 14)
    ys = T.y_spine(zz)
    for s in (-1, 1):
        para = np.stack([np.full_like(zz, s * 38.0), ys - 48 + 8 * (zz > 330), zz], 1)
        _put_shape(cv, _tube(cv, *_spline(para, np.interp(zz, [0, 150, 300, 540], [18, 30, 26, 20]), 30)), MUSCLE, cv.hu_of("muscle"))
        psoas = [(s * 28, T.y_spine(300) + 2, 300), (s * 42, T.y_spine(220) + 2, 220), (s * 55, T.y_spine(140) + 18, 140), (s * 70, 35, 50), (s * 72, 45, 0)]
        _put_shape(cv, _tube(cv, *_spline(psoas, [8, 18, 22, 18, 16], 20)), MUSCLE, cv.hu_of("muscle"))
        _put_shape(cv, _quadric(cv, (s * 85, T.y_spine(60) - 35, 55), (55, 45, 75)), MUSCLE, cv.hu_of("muscle"))
    bone = 300 - 1.2 * (T.spec.age - 40)
    for s in (-1, 1):  # iliac wings (thin plates), acetabula/femoral heads, pubic rami
        wing = _quadric(cv, (s * 88, T.y_spine(150) + 12, 140), (10, 62, 58), _rot(0, 0, -s * 38))
        _put_shape(cv, wing, BONE, lambda rho, c: np.where(rho > 0.55, 800.0, bone))
        _put_shape(cv, _quadric(cv, (s * 92, 22, 38), (26, 26, 26)), BONE, lambda rho, c: np.where(rho > 0.6, 700.0, bone))
        _put_shape(cv, _tube(cv, *_spline([(s * 88, 25, 38), (s * 45, 60, 18), (s * 10, 72, 12)], 8, 15)), BONE, 600.0)
    front = T.BA(430)
    _put_shape(cv, _tube(cv, *_spline([(0, front - 8, 505), (0, T.BA(360) - 8, 345)], 9, 20)), BONE, lambda q, c: np.where(q > 0.6, 700.0, bone))
    canal = np.stack([np.zeros_like(zz), ys - 28 - 10 * (zz < 140), zz], 1)
    _put_shape(cv, _tube(cv, *_spline(canal, 9, 30)), SOFT, 35.0)
    yt = T.y_spine(500) + 52
    _put_shape(cv, _tube(cv, *_spline([(0, yt, 550), (0, yt - 4, 470)], 9, 20)), AIRWAY, -1000.0)
    for s, end in ((1, (46, yt - 6, 448)), (-1, (-48, yt - 8, 442))):
        _put_shape(cv, _tube(cv, *_spline([(0, yt - 4, 472), end], [6.5, 5], 10)), AIRWAY, -1000.0)
    if T.female:
        _put_shape(cv, _quadric(cv, (0, 5, 78), (32, 24, 42), _rot(-25, 0, 0)), SOFT, cv.hu_of("uterus"))
    else:
        _put_shape(cv, _quadric(cv, (0, 28, 8), (20, 16, 16)), SOFT, cv.hu_of("prostate"))


def _abdomen(cv: _Canvas, T: _Torso, rng: np.random.Generator) -> dict:
    """Bowel, bladder, stomach, spleen, liver, gallbladder, duodenum, pancreas, kidneys, adrenals."""
    spec, ph = T.spec, cv.phase
    sc = lambda o: spec.organ_scale.get(o, 1.0)  # noqa: E731
    sh = lambda o: np.asarray(spec.organ_shift.get(o, (0.0, 0.0, 0.0)))  # noqa: E731
    dz = T.z_dr - 352.0  # abdominal organs ride with the diaphragm
    x, y, z = cv.axes[0][:, None, None], cv.axes[1][None, :, None], cv.axes[2][None, None, :]
    cavity_r = lambda c: T.rho(c[0], c[1], c[2], -12.0, -12.0)  # noqa: E731
    below = lambda c, gap=3.0: c[2] < T.diaphragm(c[0], c[1]) - gap  # noqa: E731
    wall_hu = cv.hu_of("bowel_wall")
    shapes: dict = {}

    # small bowel: serpentine loops through the mid/lower abdomen, filling free fat only
    pts = []
    rows = [105, 128, 151, 174, 197, 220]
    for i, zr in enumerate(rows):
        xs = np.linspace(-62, 58, 6)[:: 1 if i % 2 == 0 else -1]
        for xv in xs:
            pts.append((xv + rng.normal(0, 6), rng.uniform(0, 55), zr + rng.normal(0, 6)))
    sb = _tube(cv, *_spline(pts, 12.5, 8))
    _put_shape(cv, sb, L["small_bowel"], lambda q, c: np.where(q > 0.6, wall_hu, cv.hu_of("bowel_fluid")), where={BODY})

    # colon frame: cecum → ascending → transverse → descending → sigmoid → rectum
    ysac = lambda zv: T.y_spine(zv) + 32  # noqa: E731
    colon = [(75, 15, 140, 27), (86, -5, 200, 24), (88, -10, 252, 22), (72, 15, 278 + dz * 0.5, 21), (38, 62, 252, 20),
             (0, 70, 228, 20), (-50, 55, 258, 20), (-84, 5, 300 + dz * 0.5, 19), (-96, -15, 250, 17), (-92, -10, 180, 16),
             (-74, 10, 130, 15), (-30, 45, 116, 15), (-5, 20, 98, 15), (0, ysac(80), 80, 17), (0, ysac(40), 40, 18), (0, ysac(5) + 5, 0, 15)]
    cp = np.array(colon, float)
    cp[:, :3] += rng.normal(0, 3, (len(cp), 3))
    P, R = _spline(cp[:, :3], cp[:, 3], 9)
    R = R * (1 + 0.12 * np.cos(np.arange(len(R)) * 2.1))  # haustral bulges
    col = _tube(cv, P, R)
    gas_level = 35 - 40 * spec.bowel_gas
    if col is not None:
        sl, m, q, (cx, cy, cz) = col
        content = np.where(q > 0.78, wall_hu, cv.hu_of("colon_content"))
        stool = ndimage.gaussian_filter(rng.standard_normal(q.shape).astype(np.float32), 1.0) * 150
        content = np.where(q <= 0.78, content + stool, content)
        gas = (q <= 0.8) & (cy > gas_level + 0 * cz) & (cz > 60)
        cv.put(sl, m, L["colon"], np.where(gas, -950.0, content))
    shapes["colon"] = col

    fill = 0.55 + 0.6 * spec.bladder_fill
    bl = _quadric(cv, np.array((0, 32, 14 + 34 * fill)) + sh("urinary_bladder"), np.array((44, 36, 32)) * fill * sc("urinary_bladder"))
    shapes["urinary_bladder"] = _put_shape(cv, bl, L["urinary_bladder"], cv.hu_of("bladder"))

    # stomach: J-shaped tube from the fundus under the left dome to the pylorus
    s_ = sc("stomach")
    st = np.array([(-58, 2, T.z_dl - 32), (-62, 28, T.z_dl - 68), (-45, 58, T.z_dl - 98), (-8, 70, 250 + dz * 0.4), (20, 50, 262 + dz * 0.4)]) + sh("stomach")
    sto = _tube(cv, *_spline(st, np.array([36, 33, 28, 22, 13]) * s_, 8))
    if sto is not None:
        sl, m, q, (cx, cy, cz) = sto
        m = m & below((cx, cy, cz))
        level = 40 + 25 * (1 - spec.bowel_gas)
        hu = np.where(q > 0.8, cv.hu_of("bowel_wall"), np.where(cy > level, -980.0, cv.hu_of("stomach_fluid")))
        cv.put(sl, m, L["stomach"], hu)
    shapes["stomach"] = sto

    # spleen: posterolateral left, under the left dome
    spc = np.array((-95, -42, T.z_dl - 48)) + sh("spleen")
    spl = _quadric(cv, spc, np.array((26, 58, 48)) * sc("spleen"), _rot(0, 15, 35))
    if spl is not None:
        sl, m, rho, c = spl
        m = m & below(c) & (cavity_r(c) <= 1)
        cv.put(sl, m, L["spleen"], cv.hu_of("spleen"))
    shapes["spleen"] = spl

    # liver: tilted ellipsoid under the right dome, trimmed by the diaphragm and body wall
    lc = np.array((48, 8, T.z_dr - 62)) + sh("liver")
    lv = _quadric(cv, lc, np.array((112, 96, 86)) * sc("liver"), _rot(0, 12, 0))
    if lv is not None:
        sl, m, rho, c = lv
        # inferior surface rises from the right lobe tip to the thin anterior left lobe
        medial = np.clip(70 - c[0], 0, None)
        bottom = T.z_dr - 160 * sc("liver") + 0.9 * medial + 0.4 * medial * np.clip((45 - c[1]) / 40, 0, 1)
        left_post = (c[0] < -5) & (c[1] < 5 + 0.6 * (-5 - c[0]))
        m = m & below(c) & (cavity_r(c) <= 1) & (c[2] > bottom) & ~left_post
        cv.put(sl, m, L["liver"], cv.hu_of("liver"))
    shapes["liver"] = lv

    gb = _quadric(cv, np.array((48, 58, T.z_dr - 118)) + sh("gallbladder"), np.array((15, 16, 34)) * sc("gallbladder"), _rot(-40, -15, 0))
    shapes["gallbladder"] = _put_shape(cv, gb, L["gallbladder"], lambda rho, c: np.where(rho > 0.75, 35.0, cv.hu_of("gallbladder")))

    duo = [(20, 50, 262 + dz * 0.4), (45, 28, 268 + dz * 0.3), (60, 6, 252), (60, 4, 214), (34, 16, 198), (-8, 38, 200), (-30, 34, 222), (-36, 32, 246)]
    shapes["duodenum"] = _put_shape(cv, _tube(cv, *_spline(duo, 12, 8)), L["duodenum"], lambda q, c: np.where(q > 0.6, wall_hu, 20.0))

    pan_dz = dz * 0.4
    pan = np.array([(38, 18, 226), (12, 42, 248), (-25, 42, 262), (-68, 12, 272), (-86, -14, 278)]) + (0, 0, pan_dz) + sh("pancreas")
    sc_p = sc("pancreas")
    panc = _tube(cv, *_spline(pan, np.array([19, 12, 12, 11, 9]) * sc_p, 8))
    shapes["pancreas"] = _put_shape(cv, panc, L["pancreas"], cv.hu_of("pancreas"))

    # kidneys: retroperitoneal, left higher, upper poles medial and posterior; cortex/medulla
    kz = {1: 244 + dz * 0.5, -1: 258 + dz * 0.5}
    for s in (1, -1):
        c = np.array((s * 74, T.y_spine(kz[s]) - 6, kz[s])) + sh("kidney") * (s, 1, 1)
        kid = _quadric(cv, c, np.array((27, 24, 55)) * sc("kidney"), _rot(-12, s * 14, -s * 30))
        shapes[f"kidney_{'right' if s > 0 else 'left'}"] = _put_shape(
            cv, kid, L["kidney"], lambda rho, cc: np.where(rho > 0.5, cv.hu_of("kidney_cortex"), cv.hu_of("kidney_medulla")))
        top = c[2] + 52 * sc("kidney")
        ad = _quadric(cv, (s * 44, T.y_spine(top) + 10, top + 8 - 6 * (s < 0)), (10, 7, 17), _rot(0, 0, s * 30))
        shapes[f"adrenal_gland_{'right' if s > 0 else 'left'}"] = _put_shape(cv, ad, L["adrenal_gland"], cv.hu_of("adrenal"))

    # portal and splenic veins
    conf = np.array((8, 30, 250 + pan_dz))
    pv = [conf, (30, 24, 276 + dz * 0.6), (46, 16, 296 + dz * 0.8), (80, 10, 306 + dz)]
    _put_shape(cv, _tube(cv, *_spline(pv, [8, 8, 7, 5], 8)), L["portal_splenic_vein"], cv.hu_of("portal"))
    _put_shape(cv, _tube(cv, *_spline([(46, 16, 296 + dz * 0.8), (5, 40, 312 + dz)], [6, 4.5], 8)), L["portal_splenic_vein"], cv.hu_of("portal"))
    spv = [conf, (-28, 30, 262 + pan_dz), (-68, 0, 272 + pan_dz), (-84, -22, 280 + pan_dz)]
    _put_shape(cv, _tube(cv, *_spline(spv, [6, 5.5, 5.5, 5], 8)), L["portal_splenic_vein"], cv.hu_of("portal"))
    return shapes


def _vessels_and_chest(cv: _Canvas, T: _Torso, rng: np.random.Generator) -> dict:
    """IVC, aorta (+ iliac arteries/veins), SVC, esophagus, heart."""
    ys = T.y_spine
    shapes: dict = {}
    zr = T.z_dr
    ivc = [(14, ys(185) + 26, 182), (24, ys(240) + 28, 240), (26, ys(300) + 32, 300), (24, ys(zr - 30) + 40, zr - 30), (14, ys(zr + 10) + 56, zr + 12)]
    shapes["ivc"] = _put_shape(cv, _tube(cv, *_spline(ivc, [10, 11, 11, 12, 13], 10)), L["inferior_vena_cava"], cv.hu_of("ivc"))
    for s in (-1, 1):  # iliac veins and arteries (not classes: body, with vessel HU)
        _put_shape(cv, _tube(cv, *_spline([(8 * s + 6, ys(185) + 24, 184), (s * 52, ys(120) + 18, 115), (s * 78, 30, 40)], 8, 12)), VESSEL, cv.hu_of("vessel_v"))
        _put_shape(cv, _tube(cv, *_spline([(-5, ys(186) + 34, 186), (s * 50, ys(125) + 32, 118), (s * 76, 45, 40)], 6, 12)), VESSEL, cv.hu_of("vessel_a"))
    ao = [(-4, ys(440) + 86, zr + 85), (6, ys(470) + 90, 468), (-4, ys(495) + 66, 494), (-20, ys(490) + 32, 490), (-26, ys(460) + 12, 462),
          (-26, ys(400) + 8, 400), (-20, ys(zr - 20) + 18, zr - 20), (-14, ys(270) + 28, 270), (-10, ys(210) + 30, 210), (-6, ys(186) + 30, 186)]
    rad = [15, 15, 13, 12, 12, 11.5, 11, 10, 9.5, 9]
    shapes["aorta"] = _put_shape(cv, _tube(cv, *_spline(ao, rad, 8)), L["aorta"], cv.hu_of("aorta"))
    _put_shape(cv, _tube(cv, *_spline([(26, ys(530) + 62, 548), (20, ys(450) + 68, zr + 95)], 10, 15)), VESSEL, cv.hu_of("vessel_v"))
    es = [(-3, ys(545) + 30, 548), (-6, ys(470) + 24, 470), (-8, ys(400) + 28, 400), (-24, ys(T.z_dl) + 46, T.z_dl - 6), (-42, 10, T.z_dl - 28)]
    air = rng.random() < 0.4
    shapes["esophagus"] = _put_shape(cv, _tube(cv, *_spline(es, 8.5, 8)), L["esophagus"],
                                     lambda q, c: np.where((q < 0.3) & air, -900.0, cv.hu_of("esophagus")))
    # heart: base right-posterior-superior, apex left-anterior-inferior, resting on the diaphragm
    hs = T.spec.organ_scale.get("heart", 1.0)
    hc = np.array((-28, ys(zr + 48) + 96, zr + 50)) + np.asarray(T.spec.organ_shift.get("heart", (0, 0, 0)))
    heart = _quadric(cv, hc, np.array((60, 47, 50)) * hs, _rot(-20, 25, -30))
    if heart is not None:
        sl, m, rho, c = heart
        m = m & (c[2] > T.diaphragm(c[0], c[1]) + 2)
        pool = np.where(c[0] < hc[0] + 0.4 * (c[1] - hc[1]), cv.hu_of("heart_left"), cv.hu_of("heart_right"))
        cv.put(sl, m, L["heart"], np.where(rho > 0.55, cv.hu_of("myocardium"), pool))
    shapes["heart"] = heart
    return shapes


def _skeleton(cv: _Canvas, T: _Torso) -> None:
    """Vertebral column (bodies, arches, processes) and sacrum, labelled vertebrae."""
    bone_t = 300 - 1.2 * (T.spec.age - 40)
    V = L["vertebrae"]
    cortex = lambda rho, c: np.where(rho > 0.82, 900.0, bone_t)  # noqa: E731
    for name, zc, hh, rx, ry in T.levels():
        yc = float(T.y_spine(zc))
        _put_shape(cv, _quadric(cv, (0, yc, zc), (rx, ry, hh), pz=6), V, cortex)
        yk = yc - ry - 9  # spinal canal centre
        ring = _quadric(cv, (0, yk, zc - 2), (rx * 0.55 + 5, 15, hh * 0.9), pz=6)
        if ring is not None:
            sl, m, rho, (x, y, z) = ring
            m = m & (((x / 9.0) ** 2 + ((y - yk) / 8.0) ** 2) > 1)
            cv.put(sl, m, V, 700.0)
        tilt = 35 if name.startswith("T") else 10
        _put_shape(cv, _quadric(cv, (0, yk - 24, zc - 8), (4.5, 18, 6), _rot(-tilt, 0, 0)), V, 650.0)
        for s in (-1, 1):
            _put_shape(cv, _quadric(cv, (s * (rx * 0.55 + 18), yk - 4, zc), (16 if name[0] == "L" else 13, 6, 6)), V, 650.0)
    # sacrum: bodies shrinking down a posteriorly curving line, with alae at S1
    for i, zc in enumerate(np.linspace(112, 20, 5)):
        yc = float(T.y_spine(zc)) + 4
        _put_shape(cv, _quadric(cv, (0, yc, zc), (24 - 3.5 * i, 14 - 1.5 * i, 10.5), _rot(-30, 0, 0), pz=4), V, cortex)
    _put_shape(cv, _quadric(cv, (0, float(T.y_spine(100)) - 4, 100), (62, 18, 24), _rot(-25, 0, 0)), V, cortex)


def _lungs_and_ribs(cv: _Canvas, T: _Torso, rng: np.random.Generator, texture: np.ndarray) -> None:
    """Lungs fill the free fat above the diaphragm inside the rib cage; then the parametric ribs."""
    zlo = T.diaphragm(np.array(0.0), np.array(-120.0)) - 70
    w = cv.window((-200, -200, float(zlo) - 20), (200, 200, 560))
    if w is None:
        return
    sl, (x, y, z) = w
    # rib cage superellipse per z: front just inside the anterior wall, back near the rib angles
    front = T.BA(z) - 16
    back = T.y_spine(z) - 34
    yc, b = (front + back) / 2, (front - back) / 2
    a = T.A(z) - 16
    u, v = x / a, (y - yc) / b
    rc = (np.abs(u) ** 2.4 + np.abs(v) ** 2.4) ** (1 / 2.4)
    dia = T.diaphragm(x, y)
    ls = T.spec.organ_scale.get("lung", 1.0)
    zt = 532.0
    for s in (1, -1):
        apex = (((x - s * 62) / (64 * ls)) ** 2 + ((y - T.y_spine(490) - 40) / 62) ** 2 + (np.maximum(z - 460, 0) / (zt - 460)) ** 2) <= 1
        side = (s * x > (8 if s > 0 else 14))
        m = apex & side & (rc < 1 - 7 / a) & (z > dia + 2)
        vessel = np.clip(texture[sl] - 1.4, 0, 0.8) * 650
        grav = 60 * np.clip((-(y - yc) / b), 0, 1)  # dependent lung is denser
        cv.put(sl, m, L["lung"], cv.hu_of("lung") + grav + vessel, where={BODY})
    # ribs: rib k sits at the height of T_k posteriorly and slopes down by `drop` anteriorly
    # only the voxels of the rib-cage shell can be rib or cartilage: evaluate the rest there alone
    shell = np.abs(rc - 1) < 5.5 / a
    at = np.nonzero(shell)
    pick = lambda arr: np.broadcast_to(arr, shell.shape)[at]  # noqa: E731
    ub, vb, zb, xb, ab, rcb = pick(u), pick(v), pick(z), pick(x), pick(a), rc[at]
    theta = np.arctan2(np.abs(ub), -vb) / np.pi  # 0 posterior midline .. 1 anterior midline
    drop = 78 * theta**1.4
    pitch, z1 = 22.0, T.levels()[0][1] - 4
    kf = (z1 - (zb + drop)) / pitch + 1
    k = np.rint(kf)
    tmax = _RIB_TMAX[np.clip(k, 1, 12).astype(int) - 1]
    dz = np.abs(kf - k) * pitch
    rib_at = (dz < 5.5) & (k >= 1) & (k <= 12) & (theta < tmax) & (np.abs(xb) > 26)
    cart_at = (dz < 4.5) & (k >= 1) & (k <= 7) & (theta >= tmax) & (np.abs(xb) > 8)
    bone_t = 320 - 1.2 * (T.spec.age - 40)
    ribm, cart, rib_hu = np.zeros(shell.shape, bool), np.zeros(shell.shape, bool), np.zeros(shell.shape, np.float32)
    ribm[at], cart[at] = rib_at, cart_at
    rib_hu[at] = np.where((np.abs(rcb - 1) > 3.0 / ab) | (dz > 3.5), 950.0, bone_t)
    cv.put(sl, cart, SOFT, cv.hu_of("cartilage"), where={BODY, MUSCLE, L["lung"]})
    cv.put(sl, ribm, L["rib"], rib_hu, where={BODY, MUSCLE, L["lung"], SOFT})


# how far round from the back (0) to the front (1) ribs 1..12 stay bone before their cartilage
_RIB_TMAX = np.array([0.78] * 7 + [0.7, 0.68, 0.64, 0.5, 0.38])


# --------------------------------------------------------------------------------------------
# Tumours
# --------------------------------------------------------------------------------------------
_FIB = None


def _fib_dirs(n: int = 200) -> np.ndarray:
    global _FIB
    if _FIB is None:
        i = np.arange(n) + 0.5
        phi = np.arccos(1 - 2 * i / n)
        th = np.pi * (1 + 5**0.5) * i
        _FIB = np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)
    return _FIB


def _tumor(cv: _Canvas, t: TumorSpec, rng: np.random.Generator, spec: PhantomSpec) -> dict:
    """Place one lumpy sphere of equivalent diameter ``t.size_mm`` deep inside its organ."""
    organ = L[t.site]
    side = t.side
    if t.site in PAIRED and side is None:
        side = str(rng.choice(["left", "right"]))
    if t.site not in PAIRED:
        side = None
    lobes = rng.normal(0, 1, (4, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    amp = rng.uniform(0.08, 0.2, 4)
    target = rng.uniform(0, 1, 3)  # where inside the organ's box to aim (grid independent)
    dens = rng.uniform(-1, 1)
    radius_eq = t.size_mm / 2
    lump = lambda d: 1 + (amp * (d @ lobes.T) ** 2).sum(-1) - amp.sum() / 3  # noqa: E731
    r0 = radius_eq / np.mean(lump(_fib_dirs()) ** 3) ** (1 / 3)  # volume-preserving base radius

    world = [a * s for a, s in zip(cv.axes, cv.scale)]
    m = cv.lab == organ
    if side is not None:
        xs = world[0][:, None, None]
        m = m & ((xs > 0) if side == "right" else (xs < 0))
    idx = np.argwhere(m)
    rec = {"site": t.site, "side": side, "size_mm": float(round(t.size_mm, 1))}
    if len(idx) == 0:
        return rec
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    depth = ndimage.distance_transform_edt(np.pad(m[box], 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
    need = min(0.85 * radius_eq, 0.8 * float(depth.max()))
    cand = np.argwhere(depth >= need)
    aim = (target * (hi - lo - 1))
    best = cand[np.argmin(((cand - aim) * cv.spacing) ** 2 @ np.ones(3))] + lo
    c = np.array([world[i][best[i]] for i in range(3)])
    ext = r0 * (1 + amp.sum()) + max(cv.spacing)
    sl = []
    for i in range(3):
        i0, i1 = np.searchsorted(world[i], c[i] - ext), np.searchsorted(world[i], c[i] + ext, "right")
        sl.append(slice(int(i0), int(i1)))
    sl = tuple(sl)
    X, Y, Z = world[0][sl[0]][:, None, None] - c[0], world[1][sl[1]][None, :, None] - c[1], world[2][sl[2]][None, None, :] - c[2]
    dist = np.sqrt(X**2 + Y**2 + Z**2) + 1e-6
    d = np.stack(np.broadcast_arrays(X / dist, Y / dist, Z / dist), -1)
    inside = dist <= r0 * lump(d)
    # the mass replaces its organ and may bulge into surrounding fat, never into other organs
    allowed = {organ, TUMOR, BODY} if t.site not in ("lung",) else {organ, TUMOR}
    base = cv.hu[sl][cv.lab[sl] == organ].mean() if (cv.lab[sl] == organ).any() else 40.0
    delta = TUMOR_DELTA.get(t.site, (-15, 25, 25))[cv.phase]
    if t.site == "lung":
        hu = 38.0 + 6 * dens
    elif t.site in ("vertebrae", "rib"):
        hu = 60.0 if dens < 0.4 else 900.0  # lytic or sclerotic metastasis
    elif t.site in BLOOD_POOL_SITES:
        hu = BLOOD_POOL_MASS_HU[cv.phase] + 8 * dens
    else:
        hu = base + (delta if delta is not None else 0) + 8 * dens
    core = dist <= 0.45 * r0
    hu_map = np.where(core & (t.size_mm > 35), hu - 25, hu).astype(np.float32)
    cv.put(sl, inside, TUMOR, hu_map, where=allowed)
    return rec


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Unit-variance smooth random field (float32) with the given per-axis sigma in voxels."""
    n = rng.standard_normal(shape, dtype=np.float32)
    f = ndimage.gaussian_filter(n, sigma_vox, mode="wrap", truncate=2.5)
    return f / (f.std() + 1e-6)


def _extent(T: _Torso, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-mm torso box (lo, hi): skin to skin in x/y (small air margin), 0..height in z."""
    zz = np.linspace(0, REF_HEIGHT, 55)
    half_x = float((T.A(zz) + T.fat_x).max())
    yb = float((T.BP(zz) + T.fat_y).max())
    ya = float((T.BA(zz) + T.fat_y).max())
    if T.female:
        ya = max(ya, float(T.BA(415)) + 20 + 45 * T.spec.habitus)
    m = 1.04
    lo = np.array([-half_x * m * scale[0], -yb * m * scale[1], 0.0])
    hi = np.array([half_x * m * scale[0], ya * m * scale[1], REF_HEIGHT * scale[2]])
    return lo, hi


def render_phantom(seed: int, grid: tuple[int, int, int], spec: PhantomSpec | None = None) -> PhantomCase:
    """Render one case on ``grid`` voxels over its torso box; deterministic in ``(seed, grid, spec)``.

    Returns labels (X, Y, Z) uint8 ids 0..21, CT (X, Y, Z) int16 HU, a diagonal RAS affine,
    the spec, findings and report text. When ``spec`` is None it is drawn from the seed.
    """
    from guidegen.data.phantom_reports import write_report

    try:
        grid = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise GuideGenError(f"phantom grid must be three integers, got {grid!r}") from None
    if len(grid) != 3 or not all(8 <= g <= 512 for g in grid):
        raise GuideGenError(f"phantom grid must be three sizes in 8..512, got {grid}")
    rng = np.random.default_rng(seed)
    if spec is None:
        spec = sample_spec(rng)
    _check_spec(spec)
    geo_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1])  # geometry jitter: grid independent
    tex_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2])  # texture and noise: grid dependent
    scale = np.asarray(spec.scale, float)
    T = _Torso(spec)
    lo, hi = _extent(T, scale)
    cv = _Canvas(grid, lo, hi, scale, PHASES.index(spec.phase))

    sig = np.clip(3.0 / cv.spacing, 0.35, 4.0)
    texture = _smooth_noise(tex_rng, grid, sig)
    _body(cv, T, geo_rng)
    _musculoskeletal_soft(cv, T)
    _abdomen(cv, T, geo_rng)
    _vessels_and_chest(cv, T, geo_rng)
    _skeleton(cv, T)
    _lungs_and_ribs(cv, T, geo_rng, texture)
    tumors = [_tumor(cv, t, geo_rng, spec) for t in spec.tumors]

    tissue = cv.lab.copy()
    labels = cv.lab
    labels[labels >= 100] = BODY
    # CT: organ texture, partial-volume blur, scanner noise
    hu = cv.hu
    soft = (labels != 0) & (labels != L["lung"])
    hu += np.where(soft, 7.0, 0.0).astype(np.float32) * texture
    hu = ndimage.gaussian_filter(hu, np.clip(0.6 * 2.0 / cv.spacing, 0.3, 0.7), truncate=2.0)
    sigma = float(tex_rng.uniform(9, 17))
    hu += tex_rng.standard_normal(grid, dtype=np.float32) * sigma
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(cv.spacing)
    affine[:3, 3] = lo + cv.spacing / 2
    findings = {
        "sex": spec.sex, "age": int(spec.age), "tumors": tumors,
        "t_stage": spec.t_stage, "n_stage": spec.n_stage, "m_stage": spec.m_stage,
        "phase": spec.phase, "smoking": spec.smoking,
    }
    text = write_report(findings, np.random.default_rng([int(seed) & 0xFFFFFFFF, 3]))
    return PhantomCase(labels=labels, ct=ct, affine=affine, spec=spec, findings=findings, text=text, tissue=tissue)


def spec_to_dict(spec: PhantomSpec) -> dict:
    """JSON-friendly dict of a spec (for dataset metadata)."""
    return asdict(spec)
