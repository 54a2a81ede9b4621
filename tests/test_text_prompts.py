"""Knowledge augmentation: canonical prompt and findings vector."""

from __future__ import annotations

import numpy as np

from guidegen.text.findings import ORGAN_SITES, Findings, Tumor
from guidegen.text.prompts import FINDINGS_DIM, FINDINGS_LAYOUT, canonical_prompt, findings_slices, findings_vector


def test_canonical_prompt_spells_out_defaults():
    p = canonical_prompt(Findings())
    for phrase in ("unknown sex", "unknown age", "no tumour", "Stage: unknown", "Contrast: unknown", "Smoking: unknown"):
        assert phrase in p
    assert p.endswith(".")


def test_canonical_prompt_is_order_independent_and_complete():
    a = Findings("male", 62, [Tumor("liver", None, 20.0), Tumor("kidney", "left", 40.0)], "T3", None, "M0", "portal_venous", True)
    b = Findings("male", 62, [Tumor("kidney", "left", 40.0), Tumor("liver", None, 20.0)], "T3", None, "M0", "portal_venous", True)
    p = canonical_prompt(a)
    assert p == canonical_prompt(b)
    for phrase in ("62-year-old male", "T3, N unknown, M0", "portal venous phase", "smoker", "2 tumours",
                   "40 mm tumour in the left kidney", "20 mm tumour in the liver"):
        assert phrase in p
    # the short fixed fields come before the tumour list (truncation only drops tumours)
    assert p.index("Smoking") < p.index("tumour")


def test_findings_vector_layout_and_values():
    assert FINDINGS_DIM == sum(n for _, n in FINDINGS_LAYOUT) == 65
    sl = findings_slices()
    v0 = findings_vector(Findings())
    assert v0.shape == (FINDINGS_DIM,) and v0.dtype == np.float32
    # every one-hot block of an all-unknown record points at its 'unknown' slot
    for name in ("sex", "age_decade", "t_stage", "n_stage", "m_stage", "phase", "smoking"):
        block = v0[sl[name]]
        assert block.sum() == 1 and block[-1] == 1, name
    assert v0[sl["tumor_present"]][0] == 0 and v0[sl["count_onehot"]][0] == 1

    f = Findings("female", 64, [Tumor("kidney", "left", 32.0), Tumor("kidney", "right", None), Tumor("liver", None, 80.0)],
                 "T2", "N1", "M0", "arterial", False)
    v = findings_vector(f)
    assert ((v >= 0) & (v <= 1)).all()
    assert v[sl["sex"]].tolist() == [0, 1, 0]
    assert v[sl["age_decade"]].argmax() == 4  # 60s
    site = v[sl["site_counts"]]
    assert site[ORGAN_SITES.index("kidney")] == 0.5 and site[ORGAN_SITES.index("liver")] == 0.25 and site.sum() == 0.75
    assert v[sl["side"]].tolist() == [1, 1, 1]
    assert np.isclose(v[sl["log_size"]][0], np.log1p(80) / np.log1p(200)) and v[sl["log_size"]][1] == 1
    assert v[sl["count_onehot"]].tolist() == [0, 0, 0, 1]
    assert v[sl["t_stage"]].argmax() == 3 and v[sl["n_stage"]].argmax() == 1 and v[sl["m_stage"]].argmax() == 0
    assert v[sl["phase"]].argmax() == 1 and v[sl["smoking"]].tolist() == [0, 1, 0]
    assert not np.array_equal(v, v0)
