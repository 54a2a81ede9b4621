"""Knowledge augmentation: findings → a canonical prompt and a fixed-length findings vector.

The paper builds its prompt from structured records ("The patient is {demographics}. In this
imaging, ...") so that every prompt states every field; a report's phrasing, order and
omissions then stop being noise the encoder has to learn away. :func:`canonical_prompt` does
that here: one deterministic English text per :class:`~guidegen.text.findings.Findings`, with
defaults written out ("of unknown sex", "no tumour", "unknown T stage"). It is written so that
:func:`~guidegen.text.findings.parse_findings` reads it back to the same findings (a tested
round trip).

:func:`findings_vector` gives the same facts as numbers, one block per field (the layout is
:data:`FINDINGS_LAYOUT`; every value is in [0, 1]):

==================  ======  ===========================================================
block               length  content
==================  ======  ===========================================================
sex                 3       one-hot male, female, unknown
age_decade          8       one-hot <30, 30s, 40s, 50s, 60s, 70s, >=80, unknown
age_scaled          1       age / 100 (0 when unknown)
tumor_present       1       1 if any tumour
site_counts         19      per organ group (label-set order), min(count, 4) / 4
side                3       any left tumour, any right tumour, any tumour without side
log_size            2       log1p(largest size mm) / log1p(200), size-known flag
count_scaled        1       min(count, 10) / 10
count_onehot        4       one-hot 0, 1, 2, >=3 tumours
t_stage             7       one-hot T0, Tis, T1, T2, T3, T4, unknown
n_stage             5       one-hot N0, N1, N2, N3, unknown
m_stage             3       one-hot M0, M1, unknown
phase               5       one-hot non_contrast, arterial, portal_venous, delayed, unknown
smoking             3       one-hot yes, no, unknown
==================  ======  ===========================================================

:data:`FINDINGS_DIM` = 65.
"""

from __future__ import annotations

import math

import numpy as np

from guidegen.text.findings import (
    M_STAGES, N_STAGES, ORGAN_SITES, PHASES, SEXES, T_STAGES, Findings, Tumor,
)

_AGE_EDGES = (30, 40, 50, 60, 70, 80)  # decade bins: <30, 30s, ..., 70s, >=80
_MAX_SIZE_MM = 200.0

FINDINGS_LAYOUT: tuple[tuple[str, int], ...] = (
    ("sex", len(SEXES) + 1),
    ("age_decade", len(_AGE_EDGES) + 2),
    ("age_scaled", 1),
    ("tumor_present", 1),
    ("site_counts", len(ORGAN_SITES)),
    ("side", 3),
    ("log_size", 2),
    ("count_scaled", 1),
    ("count_onehot", 4),
    ("t_stage", len(T_STAGES) + 1),
    ("n_stage", len(N_STAGES) + 1),
    ("m_stage", len(M_STAGES) + 1),
    ("phase", len(PHASES) + 1),
    ("smoking", 3),
)
FINDINGS_DIM: int = sum(n for _, n in FINDINGS_LAYOUT)


def findings_slices() -> dict[str, slice]:
    """Name → slice of each block in a findings vector."""
    out, start = {}, 0
    for name, n in FINDINGS_LAYOUT:
        out[name] = slice(start, start + n)
        start += n
    return out


def _onehot(values: tuple[str, ...], value: str | None) -> list[float]:
    """One-hot over ``values`` plus a final 'unknown' slot (also used for unexpected values)."""
    v = [0.0] * (len(values) + 1)
    v[values.index(value) if value in values else len(values)] = 1.0
    return v


def findings_vector(findings: Findings) -> np.ndarray:
    """``(FINDINGS_DIM,)`` float32 vector in [0, 1]; see the module docstring for the layout."""
    f = findings
    parts: list[list[float]] = [_onehot(SEXES, f.sex)]
    decade = [0.0] * (len(_AGE_EDGES) + 2)
    decade[-1 if f.age is None else sum(f.age >= e for e in _AGE_EDGES)] = 1.0
    parts += [decade, [0.0 if f.age is None else min(f.age, 100) / 100.0]]
    tumors = f.tumors
    parts.append([1.0 if tumors else 0.0])
    parts.append([min(sum(t.site == s for t in tumors), 4) / 4.0 for s in ORGAN_SITES])
    parts.append([float(any(t.side == "left" for t in tumors)), float(any(t.side == "right" for t in tumors)),
                  float(any(t.side is None for t in tumors))])
    sizes = [t.size_mm for t in tumors if t.size_mm is not None]
    parts.append([math.log1p(min(max(sizes), _MAX_SIZE_MM)) / math.log1p(_MAX_SIZE_MM) if sizes else 0.0,
                  1.0 if sizes else 0.0])
    n = len(tumors)
    parts.append([min(n, 10) / 10.0])
    count = [0.0] * 4
    count[min(n, 3)] = 1.0
    parts.append(count)
    parts += [_onehot(T_STAGES, f.t_stage), _onehot(N_STAGES, f.n_stage), _onehot(M_STAGES, f.m_stage),
              _onehot(PHASES, f.phase)]
    parts.append([1.0 if f.smoking is True else 0.0, 1.0 if f.smoking is False else 0.0,
                  1.0 if f.smoking is None else 0.0])
    vec = np.asarray([x for p in parts for x in p], dtype=np.float32)
    assert vec.shape == (FINDINGS_DIM,)
    return vec


# ----------------------------------------------------------------------------- rendering
_ORGAN_TEXT = {
    "small_bowel": "small bowel", "urinary_bladder": "urinary bladder", "adrenal_gland": "adrenal gland",
    "portal_splenic_vein": "portal vein", "inferior_vena_cava": "inferior vena cava",
}
_PHASE_TEXT = {"non_contrast": "non-contrast", "arterial": "arterial phase", "portal_venous": "portal venous phase",
               "delayed": "delayed phase"}


def _fmt_mm(x: float) -> str:
    return f"{x:g} mm"


def _tumour_sentence(t: Tumor) -> str:
    organ = _ORGAN_TEXT.get(t.site, t.site)
    where = f"the {t.side} {organ}" if t.side else f"the {organ}"
    if t.size_mm is None:
        return f"A tumour of unknown size in {where}."
    return f"A {_fmt_mm(t.size_mm)} tumour in {where}."


def _sort_key(t: Tumor) -> tuple:
    return (ORGAN_SITES.index(t.site) if t.site in ORGAN_SITES else 99, t.side or "", -(t.size_mm or 0.0))


def canonical_prompt(findings: Findings) -> str:
    """One complete, deterministic English text stating every field (unknowns spelled out).

    Short fixed fields come first and the tumour list last, so that truncation to an encoder's
    ``max_tokens`` can only drop trailing tumours (the findings vector still counts them). E.g.
    ``"Patient: 62-year-old male. Stage: unknown. Contrast: portal venous phase. Smoking:
    unknown. Findings: 1 tumour. A 40 mm tumour in the left kidney."`` (a partly known stage
    reads ``"Stage: T3, N unknown, M unknown."``)
    """
    f = findings
    sex = f.sex if f.sex in SEXES else None
    if f.age is not None and sex:
        who = f"{f.age}-year-old {sex}"
    elif f.age is not None:
        who = f"{f.age}-year-old, unknown sex"
    elif sex:
        who = f"{sex}, unknown age"
    else:
        who = "unknown sex, unknown age"
    stage = [s if s else f"{k} unknown" for k, s in (("T", f.t_stage), ("N", f.n_stage), ("M", f.m_stage))]
    smoking = {True: "smoker", False: "non-smoker", None: "unknown"}[f.smoking]
    stage_text = "unknown" if not (f.t_stage or f.n_stage or f.m_stage) else ", ".join(stage)
    parts = [f"Patient: {who}.", f"Stage: {stage_text}.", f"Contrast: {_PHASE_TEXT.get(f.phase, 'unknown')}.",
             f"Smoking: {smoking}."]
    tumors = sorted(f.tumors, key=_sort_key)
    if not tumors:
        parts.append("Findings: no tumour.")
    else:
        parts.append(f"Findings: {len(tumors)} tumour{'s' if len(tumors) > 1 else ''}.")
        parts += [_tumour_sentence(t) for t in tumors]
    return " ".join(parts)
