"""The procedural torso phantom: determinism, anatomy, HU ranges, tumours, grids, reports."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from guidegen.data.phantom import PhantomSpec, TumorSpec, render_phantom, sample_spec
from guidegen.data.phantom_reports import number_word, write_report
from guidegen.errors import GuideGenError


@pytest.fixture(scope="module")
def cases48():
    return [render_phantom(s, (48, 48, 64)) for s in range(6)]


def _centroid(labels, i):
    return np.argwhere(labels == i).mean(0)


def test_same_seed_identical_and_seeds_differ():
    a, b, c = render_phantom(7, (32, 32, 40)), render_phantom(7, (32, 32, 40)), render_phantom(8, (32, 32, 40))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ct, b.ct)
    assert a.text == b.text and a.findings == b.findings
    assert not np.array_equal(a.labels, c.labels) and not np.array_equal(a.ct, c.ct)


def test_dtypes_shapes_affine_and_extent(cases48, label_set):
    for c in cases48:
        assert c.labels.shape == c.ct.shape == (48, 48, 64)
        assert c.labels.dtype == np.uint8 and c.ct.dtype == np.int16 and c.affine.shape == (4, 4)
        assert c.labels.max() <= label_set.num_classes - 1
        sp = np.diag(c.affine)[:3]
        np.testing.assert_allclose(c.affine[:3, :3], np.diag(sp))  # diagonal RAS
        extent = sp * np.array(c.labels.shape)
        assert 290 <= extent[0] <= 430 and 200 <= extent[1] <= 340 and 440 <= extent[2] <= 610, extent


def test_organs_and_body_present(cases48, label_set):
    for c in cases48:
        present = set(np.unique(c.labels).tolist())
        assert sum(i in present for i in label_set.organ_ids) >= 18, [label_set.name_of(i) for i in label_set.organ_ids if i not in present]
        assert label_set.body_id in present and 0 in present


def test_anatomical_order(cases48, label_set):
    for c in cases48:
        lab = c.labels
        cen = {n: _centroid(lab, label_set.id_of(n)) for n in ["lung", "liver", "urinary_bladder", "heart", "spleen", "vertebrae"]}
        assert cen["lung"][2] > cen["liver"][2] > cen["urinary_bladder"][2]
        organ_z = [_centroid(lab, i)[2] for i in label_set.organ_ids if (lab == i).any() and i != label_set.id_of("vertebrae")]
        assert cen["urinary_bladder"][2] == pytest.approx(min(organ_z))  # bladder lowest
        lung_x = np.argwhere(lab == label_set.id_of("lung"))[:, 0]
        assert lung_x.min() < cen["heart"][0] < lung_x.max()  # heart between the lungs
        assert cen["liver"][0] > lab.shape[0] / 2 > cen["spleen"][0]  # liver on patient right (+x)
        assert cen["vertebrae"][1] < lab.shape[1] / 2  # spine posterior


def test_hu_medians_at_64(label_set):
    for seed in (0, 3):
        c = render_phantom(seed, (64, 64, 64), sample_spec(np.random.default_rng(seed), habitus=0.7))
        med = lambda n: float(np.median(c.ct[c.labels == label_set.id_of(n)]))  # noqa: E731
        assert med("lung") < -600
        assert 20 <= med("liver") <= 200
        assert med("vertebrae") > 150 and med("rib") > 150
        assert np.median(c.ct[c.labels == 0]) < -900
        fg = c.labels > 0  # subcutaneous fat: the body shell 2-3 voxels inside the skin
        shell = ndimage.binary_erosion(fg, iterations=1) & ~ndimage.binary_erosion(fg, iterations=3) & (c.labels == label_set.body_id)
        assert -140 < np.median(c.ct[shell]) < -60
        muscle = c.ct[(c.tissue == 100) & ndimage.binary_erosion(c.tissue == 100)]
        assert 20 <= np.median(muscle) <= 200


def test_contrast_phase_changes_aorta(label_set):
    rng = np.random.default_rng(0)
    base = sample_spec(rng, tumors=[])
    hu = {}
    for ph in ("non_contrast", "arterial", "portal_venous"):
        base.phase = ph
        c = render_phantom(0, (40, 40, 48), base)
        hu[ph] = float(np.median(c.ct[c.labels == label_set.id_of("aorta")]))
    assert hu["arterial"] > hu["portal_venous"] > hu["non_contrast"] + 50


@pytest.mark.parametrize("site", ["inferior_vena_cava", "portal_splenic_vein", "aorta"])
def test_blood_pool_mass_is_a_filling_defect(site, label_set):
    """A mass inside an opacified vessel is far darker than its lumen, at a soft-tissue level."""
    spec = sample_spec(np.random.default_rng(1), tumors=[TumorSpec(site, 20.0)], phase="portal_venous")
    c = render_phantom(1, (64, 64, 64), spec)
    tum = c.labels == label_set.tumor_id
    assert tum.sum() >= 4
    lumen = float(np.median(c.ct[c.labels == label_set.id_of(site)]))
    mass = float(np.median(c.ct[tum]))
    assert 50 < mass < 110, mass
    assert lumen - mass > 40, (lumen, mass)


@pytest.mark.parametrize("site,side,size", [("liver", None, 40.0), ("kidney", "left", 30.0), ("lung", "right", 25.0), ("pancreas", None, 25.0)])
def test_tumour_in_requested_organ_with_requested_size(site, side, size, label_set):
    spec = sample_spec(np.random.default_rng(5), tumors=[TumorSpec(site, size, side)])
    c = render_phantom(5, (64, 64, 64), spec)
    tum = c.labels == label_set.tumor_id
    vol = tum.sum() * np.prod(np.diag(c.affine)[:3])
    d_eq = (6 * vol / np.pi) ** (1 / 3)
    assert abs(d_eq - size) / size < 0.35, (site, d_eq)
    # the same case without the tumour (tumour placement draws come after all geometry draws)
    under = render_phantom(5, (64, 64, 64), dataclasses.replace(spec, tumors=[])).labels[tum]
    organ = label_set.id_of(site)
    assert (under == organ).mean() > 0.6, np.bincount(under)
    assert (~np.isin(under, [organ, label_set.body_id])).mean() < 0.15  # never eats other organs much
    x = np.argwhere(tum)[:, 0].mean() + 0.5
    if side is not None:  # +x is patient right in RAS
        assert (x > 32) == (side == "right")
    t = c.findings["tumors"][0]
    assert t["site"] == site and t["size_mm"] == pytest.approx(size) and (side is None or t["side"] == side)
    assert c.findings["t_stage"] is not None


def test_anisotropic_and_tiny_grids(label_set):
    c = render_phantom(2, (24, 20, 32))
    assert c.labels.shape == c.ct.shape == (24, 20, 32)
    assert len(set(np.unique(c.labels).tolist()) & set(label_set.organ_ids)) >= 12
    assert render_phantom(2, (16, 16, 16)).labels.shape == (16, 16, 16)


def test_same_case_at_two_resolutions_agrees(label_set):
    lo, hi = render_phantom(4, (32, 32, 32)), render_phantom(4, (64, 64, 64))
    np.testing.assert_allclose(np.diag(lo.affine)[:3] * 32, np.diag(hi.affine)[:3] * 64)  # same box
    for name in ("liver", "lung", "kidney"):
        i = label_set.id_of(name)
        f_lo, f_hi = (lo.labels == i).mean(), (hi.labels == i).mean()
        assert abs(f_lo - f_hi) / f_hi < 0.25, name
    assert lo.text == hi.text


def test_sample_spec_distribution_and_overrides():
    specs = [sample_spec(np.random.default_rng(s)) for s in range(200)]
    frac = np.mean([len(s.tumors) > 0 for s in specs])
    assert 0.6 < frac < 0.9
    sizes = [t.size_mm for s in specs for t in s.tumors]
    assert min(sizes) >= 10 and max(sizes) <= 60
    sites = [t.site for s in specs for t in s.tumors]
    assert {"liver", "lung", "kidney"} <= set(sites)
    assert all(s.t_stage is None for s in specs if not s.tumors)
    s = sample_spec(np.random.default_rng(0), sex="female", tumors=[])
    assert s.sex == "female" and s.tumors == [] and s.t_stage is None
    with pytest.raises(GuideGenError, match="unknown field"):
        sample_spec(np.random.default_rng(0), colour="blue")


@pytest.mark.parametrize("bad,msg", [({"phase": "delayed"}, "phase"), ({"sex": "x"}, "sex"), ({"tumors": [TumorSpec("brain", 20.0)]}, "brain")])
def test_bad_spec_is_one_line_error(bad, msg):
    spec = sample_spec(np.random.default_rng(0), **bad)
    with pytest.raises(GuideGenError, match=msg) as e:
        render_phantom(0, (16, 16, 16), spec)
    assert "\n" not in str(e.value)
    with pytest.raises(GuideGenError, match="grid"):
        render_phantom(0, (16, 16))


def test_report_states_findings_and_varies():
    f = {"sex": "male", "age": 62, "tumors": [{"site": "kidney", "side": "left", "size_mm": 40.0}, {"site": "liver", "side": None, "size_mm": 22.0}],
         "t_stage": "T2", "n_stage": "N1", "m_stage": "M1", "phase": "portal_venous", "smoking": True}
    texts = {write_report(f, np.random.default_rng(s)) for s in range(40)}
    assert len(texts) > 30
    for t in texts:
        low = t.lower()
        assert "left" in low and ("kidney" in low or "renal" in low) and ("liver" in low or "hepatic" in low)
        assert any(k in t for k in ("40 mm", "4.0 cm", "4.0 x", "40 x", "4.0-cm"))
        assert "T2" in t and "N1" in t and "M1" in t
        assert "62" in t or "sixty-two" in low
    neg = write_report({**f, "tumors": [], "t_stage": None, "n_stage": None, "m_stage": None}, np.random.default_rng(0))
    assert "T2" not in neg and any(k in neg.lower() for k in ("no ", "unremarkable"))
    assert number_word(62) == "sixty-two" and number_word(3) == "three"
