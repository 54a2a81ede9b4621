"""Unit tests of the evaluation metric math (no network training; fast)."""

from __future__ import annotations

import numpy as np
import pytest

from guidegen.data.phantom import TumorSpec, render_phantom, sample_spec
from guidegen.evaluation.degrade import shift_labels, wrong_site_findings
from guidegen.evaluation.metrics import (
    anatomical_order,
    case_stats,
    dice_per_class,
    frechet_distance,
    knn_precision_recall,
    mask_centroid,
    mask_extent,
    match_tumors,
    midline_x_mm,
    mean_dice_per_class,
    relative_w1,
)
from guidegen.evaluation.sets import ct_to_unit
from guidegen.labels import load_label_set

LS = load_label_set()


def test_frechet_distance_zero_for_same_set_and_mean_shift_for_translated():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: FD = ||shift||^2
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0, 0, 0])) == pytest.approx(5.0, rel=1e-4)
    # scaled spread increases it; more samples than dims not required (N < D works)
    assert frechet_distance(a, 3 * a) > 1.0
    small = rng.normal(size=(4, 16))
    assert np.isfinite(frechet_distance(small, small + 0.1))
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :3])


def test_knn_precision_recall_bounds():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(40, 3))
    p, r = knn_precision_recall(real, real.copy(), k=3)
    assert (p, r) == (1.0, 1.0)
    p, r = knn_precision_recall(real, real + 100.0, k=3)
    assert (p, r) == (0.0, 0.0)
    # a fake set collapsed on one real point: precise but no recall of the rest
    p, r = knn_precision_recall(real, np.repeat(real[:1], 10, axis=0) + 1e-9, k=3)
    assert p == 1.0 and r < 0.3


def _knn_pr_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The former dense (N, N, D) implementation, kept here as the reference."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, min(k, len(x) - 1)]

    def inside(ref, r, q):
        return (np.sqrt(((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1)) <= r[None, :]).any(axis=1)

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return float(inside(real, radii(real), fake).mean()), float(inside(fake, radii(fake), real).mean())


def _knn_pr_loops(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition written with explicit loops (math.dist), independent of any array formula."""
    import math

    def radius(x, i):
        return sorted(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)[min(k, len(x) - 1) - 1]

    def share(ref, q):
        r = [radius(ref, j) for j in range(len(ref))]
        return float(np.mean([any(math.dist(p, ref[j]) <= r[j] for j in range(len(ref))) for p in q]))

    return share(real, fake), share(fake, real)


@pytest.mark.parametrize("block_bytes", [None, 1, 8 * 112 * 7])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_precision_recall_blocked_equals_dense_reference(k, block_bytes):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(37, 112)), rng.normal(0.2, 1.1, size=(23, 112))
    got = knn_precision_recall(real, fake, k=k, block_bytes=block_bytes)
    assert got == _knn_pr_reference(real, fake, k)  # bit-identical distances: equal, not approx
    assert 0.0 < got[0] < 1.0 or 0.0 < got[1] < 1.0  # a non-trivial case
    small_r, small_f = rng.normal(size=(9, 4)), rng.normal(size=(7, 4))
    assert knn_precision_recall(small_r, small_f, k=k, block_bytes=block_bytes) == pytest.approx(_knn_pr_loops(small_r, small_f, k))


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_knn_precision_recall_edge_cases(block_bytes):
    rng = np.random.default_rng(7)
    base = rng.normal(size=(6, 5))
    real = np.concatenate([base, base[:3], base[:1]])  # duplicate points: radius 0 for k within the copies
    fake = np.concatenate([base[:2], base[:2] + 0.5, rng.normal(size=(4, 5))])
    for k in (1, 2, 3, len(real) - 1, len(real) + 5, 50):  # k >= N - 1: capped at the farthest other point
        got = knn_precision_recall(real, fake, k=k, block_bytes=block_bytes)
        assert got == _knn_pr_reference(real, fake, k), k
    # k past the set size: every ball reaches the farthest point of its own set
    p, r = knn_precision_recall(real, real[::-1].copy(), k=100, block_bytes=block_bytes)
    assert (p, r) == (1.0, 1.0)
    # two points (the smallest allowed set)
    assert knn_precision_recall(base[:2], base[2:4], k=3, block_bytes=block_bytes) == _knn_pr_reference(base[:2], base[2:4], 3)
    with pytest.raises(ValueError):
        knn_precision_recall(base[:1], base, k=3)


def test_knn_row_blocks_bound_memory():
    from guidegen.evaluation.metrics import _row_blocks

    blocks = list(_row_blocks(5000, 5000, 112, 64 * 2 ** 20))
    rows = [b.stop - b.start for b in blocks]
    assert sum(rows) == 5000 and blocks[0].start == 0 and blocks[-1].stop == 5000
    assert max(rows) * 5000 * 112 * 8 <= 64 * 2 ** 20  # one block's (rows, N, D) float64 temporary
    assert [b.stop - b.start for b in _row_blocks(3, 10, 4, 1)] == [1, 1, 1]  # tiny budget: one row at a time


def test_dice_per_class_values_and_nan_for_absent():
    t = np.array([0, 1, 1, 2, 2, 2])
    p = np.array([0, 1, 2, 2, 2, 0])
    d = dice_per_class(p, t, 4)
    assert d[1] == pytest.approx(2 * 1 / 3)
    assert d[2] == pytest.approx(2 * 2 / 6)
    assert np.isnan(d[3])
    m = mean_dice_per_class(np.stack([p, t]), np.stack([t, t]), 4)
    assert m[1] == pytest.approx((2 / 3 + 1.0) / 2)


def test_relative_w1():
    real = np.array([10.0, 12.0, 14.0])
    assert relative_w1(real, real) == 0.0
    assert relative_w1(real, real + 6.0) == pytest.approx(0.5)


def test_ct_to_unit_range():
    x = ct_to_unit(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0]))
    assert x.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def liver_case():
    spec = sample_spec(np.random.default_rng(3), tumors=[TumorSpec("liver", 45.0), TumorSpec("kidney", 30.0, "right")])
    return render_phantom(3, (40, 40, 48), spec)


def test_mask_centroid_and_extent_equal_the_index_list_ones():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 7, 11)) < 0.05
    idx = np.argwhere(mask)
    assert np.array_equal(mask_centroid(mask), idx.mean(0))  # bitwise: integer sums are exact
    lo, hi = mask_extent(mask)
    assert np.array_equal(lo, idx.min(0)) and np.array_equal(hi, idx.max(0))
    one = np.zeros((4, 5, 6), bool)
    one[1, 4, 2] = True
    assert mask_centroid(one).tolist() == [1.0, 4.0, 2.0]
    assert [v.tolist() for v in mask_extent(one)] == [[1, 4, 2], [1, 4, 2]]
    assert mask_centroid(np.zeros((3, 3, 3), bool)) is None and mask_extent(np.zeros((3, 3, 3), bool)) is None


def test_midline_from_the_spine_else_the_body():
    labels = np.zeros((10, 4, 4), np.uint8)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[0, 3] = -5.0
    labels[0:4] = LS.id_of("liver")  # body voxels x = 0..3: centroid 1.5 -> -2 mm
    assert midline_x_mm(labels, affine, LS) == pytest.approx(-2.0)
    labels[7, 1, 1] = LS.id_of("vertebrae")  # the spine wins: x = 7 -> 9 mm
    assert midline_x_mm(labels, affine, LS) == pytest.approx(9.0)
    assert midline_x_mm(np.zeros_like(labels), affine, LS) == 0.0


def test_case_stats_on_phantom(liver_case):
    st = case_stats(liver_case.labels, liver_case.affine, LS)
    voxel_ml = abs(np.linalg.det(liver_case.affine[:3, :3])) / 1000
    assert st.volumes_ml[LS.id_of("liver")] == pytest.approx((liver_case.labels == LS.id_of("liver")).sum() * voxel_ml)
    assert st.components[LS.id_of("liver")] >= 1
    assert st.order == {"lungs_above_liver": True, "bladder_lowest": True, "heart_between_lungs": True}
    assert len(st.tumors) >= 2


def test_anatomical_order_detects_flipped_volume(liver_case):
    flipped = liver_case.labels[:, :, ::-1]  # feet up
    order = anatomical_order(flipped, LS)
    assert order["lungs_above_liver"] is False and order["bladder_lowest"] is False


def test_tumor_placement_right_site_side_and_size(liver_case):
    st = case_stats(liver_case.labels, liver_case.affine, LS)
    res = match_tumors(liver_case.findings["tumors"], st, LS)
    assert [r["placed"] for r in res] == [True, True]
    assert all(r["size_ok"] for r in res)
    # wrong organ, wrong side or a 5x size request are caught
    wrong = match_tumors(wrong_site_findings(liver_case.findings)["tumors"], st, LS)
    assert not any(r["placed"] for r in wrong)
    other_side = match_tumors([{"site": "kidney", "side": "left", "size_mm": 30.0}], st, LS)
    assert other_side[0]["placed"] is False
    too_big = match_tumors([{"site": "liver", "side": None, "size_mm": 225.0}], st, LS)
    assert too_big[0]["placed"] is True and too_big[0]["size_ok"] is False


def test_tumor_match_takes_the_lesion_not_a_stray_voxel():
    """A stray tumour voxel deep in the organ (organ share 1.0) must not stand for a real lesion
    that bulges out of the organ (share < 1): the largest qualifying region is matched."""
    lab = np.full((20, 20, 20), LS.id_of("body"), np.uint8)
    lab[2:18, 2:18, 2:18] = LS.id_of("liver")
    lab[14:19, 8:13, 8:13] = LS.tumor_id  # 5^3 lesion crossing the liver edge into the body
    lab[5, 5, 5] = LS.tumor_id  # one stray voxel inside the liver
    st = case_stats(lab, np.diag([7.0, 7.0, 7.0, 1.0]), LS)
    assert sorted(c.voxels for c in st.tumors) == [1, 125]
    res = match_tumors([{"site": "liver", "side": None, "size_mm": 40.0}], st, LS)[0]
    d125 = (6 * 125 * 7.0**3 / np.pi) ** (1 / 3)
    assert res["placed"] and res["measured_mm"] == pytest.approx(d125, abs=0.01) and res["size_ok"]


def test_shift_labels_moves_and_fills_zero():
    lab = np.zeros((6, 6, 4), np.uint8)
    lab[1, 1, 1] = 5
    out = shift_labels(lab, (2, -1, 0))
    assert out[3, 0, 1] == 5 and out.sum() == 5
    assert shift_labels(lab, (10, 0, 0)).sum() == 0


def test_isolated_fraction_hand_cases():
    from guidegen.evaluation.metrics import isolated_fraction

    cube = np.zeros((5, 5, 5), dtype=np.uint8)
    cube[1:4, 1:4, 1:4] = 3
    assert isolated_fraction(cube) == 0.0
    cube[2, 2, 2] = 7  # one speckle inside a 27-voxel organ
    assert isolated_fraction(cube) == pytest.approx(1 / 27)
    lone = np.zeros((3, 3, 3), dtype=np.uint8)
    lone[0, 0, 0] = 2  # at the border: the padding is background, not a wrapped neighbour
    assert isolated_fraction(lone) == 1.0
    assert isolated_fraction(np.zeros((2, 2, 2), dtype=np.uint8)) == 0.0


def test_relabel_isolated_voxels_hand_cases():
    from guidegen.postprocess import isolated_voxels, relabel_isolated_voxels

    vol = np.full((5, 5, 5), 3, dtype=np.uint8)
    vol[2, 2, 2] = 7  # a lone voxel inside organ 3 → 3
    vol[0, 0, 0] = 9  # a lone corner voxel: outside counts as background, 19 of its 26 neighbours → 0
    pair = vol.copy()
    fixed, n = relabel_isolated_voxels(vol)
    assert n == 2 and fixed[2, 2, 2] == 3 and fixed[0, 0, 0] == 0 and fixed.dtype == np.uint8
    assert isolated_voxels(vol).sum() == 2 and not isolated_voxels(fixed).any()
    # two adjacent voxels are a structure, not speckle: left alone
    pair[2, 2, 2] = pair[2, 2, 3] = 7
    pair[0, 0, 0] = 3
    same, n = relabel_isolated_voxels(pair)
    assert n == 0 and np.array_equal(same, pair)
    # ties go to the smaller id; the input is not modified
    tie = np.zeros((3, 3, 3), dtype=np.int64)
    tie[0] = 5
    tie[2] = 4
    tie[1] = 6
    tie[1, 1, 1] = 1
    before = tie.copy()
    out, _ = relabel_isolated_voxels(tie)
    assert np.array_equal(tie, before)
    assert out[1, 1, 1] == 4  # neighbours: nine 5s, nine 4s, eight 6s → tie → smaller id


def test_unrequested_tumour_regions_are_relabelled_by_their_shell():
    from guidegen.postprocess import clean_label_map, drop_tumor_regions, keep_requested_lesions, tumor_regions

    liver, kidney, body, tum = LS.id_of("liver"), LS.id_of("kidney"), LS.id_of("body"), LS.tumor_id
    vol = np.full((16, 16, 16), body, np.uint8)
    vol[:8] = liver
    vol[8:] = kidney
    vol[11:13, 11:13, 11] = tum  # a 4-voxel fragment inside the kidney
    vol[2:5, 2:5, 2:5] = tum  # a 27-voxel lesion in the liver (region 1: regions are numbered in scan order)
    vol[7, 14, 14] = tum  # a 1-voxel fragment on the liver/kidney border
    cc, n = tumor_regions(vol, tum)
    assert n == 3 and cc[3, 3, 3] == 1 and cc[7, 14, 14] == 2 and cc[11, 11, 11] == 3
    out, changed = drop_tumor_regions(vol, tum, keep={1})
    assert changed == 5 and (out == tum).sum() == 27 and (out[2:5, 2:5, 2:5] == tum).all()
    assert (out[11:13, 11:13, 11] == kidney).all()
    # shell of (7,14,14): 9 voxels at x=6 and 8 at x=7 are liver (17), 9 at x=8 kidney -> liver
    assert out[7, 14, 14] == liver
    assert np.array_equal(out[vol != tum], vol[vol != tum])  # nothing else moved
    affine = np.diag([7.0, 7.0, 7.0, 1.0])
    # a liver tumour asked: the liver lesion stays; a kidney tumour asked: the kidney fragment stays
    kept, _ = keep_requested_lesions(vol, affine, LS, [{"site": "liver", "side": None, "size_mm": 30.0}])
    assert np.array_equal(kept, out)
    kept, n_k = keep_requested_lesions(vol, affine, LS, [{"site": "kidney", "side": None, "size_mm": 20.0}])
    assert n_k == 28 and (kept == tum).sum() == 4 and (kept[2:5, 2:5, 2:5] == liver).all()
    # no tumour asked: nothing removed; an asked organ with no tumour region: every region removed
    same, n0 = keep_requested_lesions(vol, affine, LS, [])
    assert n0 == 0 and np.array_equal(same, vol)
    assert (keep_requested_lesions(vol, affine, LS, [{"site": "spleen", "side": None, "size_mm": 20.0}])[0] == tum).sum() == 0
    # the default post-process: unrequested regions first (both fragments), then isolated voxels
    cleaned, counts = clean_label_map(vol, affine, LS, [{"site": "liver", "side": None, "size_mm": 30.0}])
    assert counts == {"isolated_voxels": 0, "stray_tumor_voxels": 5, "organ_part_voxels": 0} and (cleaned == tum).sum() == 27


def test_cleanup_matches_lesions_before_removing_isolated_voxels():
    from guidegen.postprocess import clean_label_map, isolated_voxels

    liver, body, tum = LS.id_of("liver"), LS.id_of("body"), LS.tumor_id
    vol = np.full((16, 16, 16), body, np.uint8)
    vol[:, :, 12:] = liver
    vol[8:10, 2:4, 13] = tum  # a 4-voxel fragment deep in the liver
    vol[6:9, 6:9, 6:9] = tum  # a 27-voxel lesion in the body envelope, touched by single liver voxels:
    vol[5, 5:10:2, 5:10:2] = liver  # 9 on one side of its 98-voxel shell
    vol[9, 7, 7] = liver  # and 1 on the other: liver share 10/98 >= 0.1, so it "touches" the liver
    assert isolated_voxels(vol)[5, 5:10:2, 5:10:2].all()
    cleaned, counts = clean_label_map(vol, np.diag([7.0, 7.0, 7.0, 1.0]), LS, [{"site": "liver", "side": None, "size_mm": 25.0}])
    # the model's lesion is the one kept; cleaning the isolated voxels first would have dropped it for the fragment
    assert (cleaned[6:9, 6:9, 6:9] == tum).all() and (cleaned == tum).sum() == 27
    # the 10 liver voxels, bridged by the lesion into one part detached from the liver, go as a
    # second liver part (the liver has one) - to the body, never to the tumour - not as isolated voxels
    assert counts == {"isolated_voxels": 0, "stray_tumor_voxels": 4, "organ_part_voxels": 10}
    assert (cleaned[5, 5:10:2, 5:10:2] == body).all() and cleaned[9, 7, 7] == body


def test_organ_parts_count_tumour_as_a_bridge():
    from guidegen.postprocess import organ_parts

    kidney, body, tum = LS.id_of("kidney"), LS.id_of("body"), LS.tumor_id
    vol = np.full((12, 12, 12), body, np.uint8)
    vol[1:4, 1:4, 1:4] = kidney  # 27 voxels
    vol[1:4, 1:4, 5:7] = kidney  # 18 voxels, joined to the first only through the lesion at z = 4
    vol[2, 2, 4] = tum
    vol[8:10, 8:10, 8:10] = kidney  # 8 voxels, detached
    parts, sizes = organ_parts(vol, kidney, tum)
    assert sorted(sizes.tolist()) == [8, 45] and parts.max() == 2
    assert (parts > 0).sum() == (vol == kidney).sum() and (parts[vol != kidney] == 0).all()
    assert parts[1, 1, 1] == parts[3, 3, 6] != parts[8, 8, 8]
    # without the tumour as a bridge the lesion cuts the kidney in two
    assert sorted(organ_parts(vol, kidney, None)[1].tolist()) == [8, 18, 27]


def test_keep_organ_parts_relabels_detached_pieces_by_their_shell():
    from guidegen.postprocess import keep_organ_parts

    liver, kidney, lung, bladder, body = (LS.id_of(n) for n in ("liver", "kidney", "lung", "urinary_bladder", "body"))
    tum = LS.tumor_id
    vol = np.full((20, 20, 20), body, np.uint8)
    vol[2:10, 2:10, 2:10] = liver  # the liver: 512 voxels
    vol[15:17, 15:17, 15:17] = liver  # a detached 8-voxel splinter in the body envelope
    vol[2:5, 13:16, 2:5] = kidney  # two kidneys: both kept (parts 2)
    vol[6:9, 13:16, 2:5] = kidney
    vol[12:19, 2:9, 12:19] = lung  # a bladder-labelled rim around a lesion, inside the lung:
    vol[14:17, 4:7, 14:17] = bladder
    vol[15, 5, 15] = tum
    vol[2:6, 15:19, 15:19] = bladder  # and the bladder itself (64 voxels)
    out, changed = keep_organ_parts(vol, LS)
    assert changed == 8 + 26
    assert (out[15:17, 15:17, 15:17] == body).all()  # the splinter takes its shell: body
    assert (out[14:17, 4:7, 14:17][vol[14:17, 4:7, 14:17] == bladder] == lung).all()  # the rim: lung, not tumour
    assert out[15, 5, 15] == tum and (out == kidney).sum() == 54 and (out == bladder).sum() == 64
    moved = (vol == bladder) & (np.indices(vol.shape)[1] < 10) | (vol == liver) & (np.indices(vol.shape)[0] >= 15)
    assert np.array_equal(out[~moved], vol[~moved])  # nothing else changed
    # a map that already has its parts is returned unchanged
    same, n = keep_organ_parts(out, LS)
    assert n == 0 and np.array_equal(same, out)


def _bladder_rim_map() -> np.ndarray:
    """(32, 32, 32): a 3-voxel bladder-labelled rim (1512 voxels, 728 of them farther than 2 voxels
    from its 6³ lesion) in the lung, and the bladder itself (900 voxels, far from any lesion)."""
    lung, bladder, body, tum = LS.id_of("lung"), LS.id_of("urinary_bladder"), LS.id_of("body"), LS.tumor_id
    vol = np.full((32, 32, 32), body, np.uint8)
    vol[8:22, 1:15, 14:28] = lung
    vol[9:21, 2:14, 15:27] = bladder
    vol[12:18, 5:11, 18:24] = tum
    vol[20:30, 20:30, 1:10] = bladder
    return vol


def test_keep_organ_parts_ranks_parts_by_their_voxels_away_from_lesions():
    from guidegen.postprocess import keep_organ_parts

    lung, bladder, body, tum = LS.id_of("lung"), LS.id_of("urinary_bladder"), LS.id_of("body"), LS.tumor_id
    vol = _bladder_rim_map()
    out, changed = keep_organ_parts(vol, LS, rim_voxels=2)  # the counts in _bladder_rim_map's docstring assume 2
    assert changed == 1512 and (out == bladder).sum() == 900 and (out[20:30, 20:30, 1:10] == bladder).all()
    rim = vol == bladder
    rim[20:30, 20:30, 1:10] = False
    assert (out[rim] == lung).all() and (out == tum).sum() == 216
    # ranked by all their voxels, the rim would have been kept and the bladder removed
    far = vol.copy()
    far[far == tum] = bladder  # no lesion: the rim and its core are one 1728-voxel bladder part
    assert (keep_organ_parts(far, LS)[0][20:30, 20:30, 1:10] == body).all()
    # judged against a lesion that is gone from the map (removed as unrequested), the rim still loses
    out, _ = keep_organ_parts(far, LS, lesions=vol == tum)
    assert (out[20:30, 20:30, 1:10] == bladder).all() and not (out[rim] == bladder).any()


def test_lesion_rim_reach_is_physical():
    from guidegen.postprocess import keep_organ_parts, lesion_rim_voxels

    demo = np.diag([7.4609, 5.6028, 8.1656, 1.0])  # the demo checkpoints' spacing
    assert lesion_rim_voxels(demo) == 2
    assert lesion_rim_voxels(np.diag([2.8, 2.1, 4.1, 1.0])) == 5  # 128 x 128 x 128 over the demo's field of view
    assert lesion_rim_voxels(np.diag([100.0, 100.0, 100.0, 1.0])) == 1
    rot = np.array([[0.0, -6.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0], [0, 0, 0, 1.0]])
    assert lesion_rim_voxels(rot) == 2  # spacing from the column norms, not the diagonal
    # a rim of 3 voxels beyond its lesion: 5 steps of reach count all of it as rim, 1 step leaves
    # part of it "away" and the rim outranks the distant bladder
    lung, bladder, body, tum = LS.id_of("lung"), LS.id_of("urinary_bladder"), LS.id_of("body"), LS.tumor_id
    vol = np.full((40, 40, 40), body, np.uint8)
    vol[5:25, 5:25, 5:25] = bladder
    vol[8:22, 8:22, 8:22] = tum
    vol[30:36, 30:36, 30:36] = bladder  # 216 voxels, the rim 5832
    assert (keep_organ_parts(vol, LS, rim_voxels=3)[0][30:36, 30:36, 30:36] == bladder).all()
    assert (keep_organ_parts(vol, LS, rim_voxels=1)[0][30:36, 30:36, 30:36] == body).all()


def test_clean_label_map_judges_organ_parts_against_the_sampled_lesions():
    """A lesion that matches no requested tumour is removed first; its bladder rim must still not
    outrank the bladder."""
    from guidegen.postprocess import clean_label_map

    vol = _bladder_rim_map()
    out, counts = clean_label_map(vol, np.eye(4), LS, [{"site": "liver", "side": None, "size_mm": 30.0}])
    assert counts["stray_tumor_voxels"] == 216 and (out == LS.tumor_id).sum() == 0
    assert (out[20:30, 20:30, 1:10] == LS.id_of("urinary_bladder")).all()
    assert (out == LS.id_of("urinary_bladder")).sum() == 900


def test_keep_organ_parts_leaves_real_phantom_maps_almost_untouched():
    from guidegen.postprocess import keep_organ_parts

    for seed in range(3):
        lab = render_phantom(seed, (48, 48, 64)).labels
        out, changed = keep_organ_parts(lab, LS)
        assert changed <= 0.0005 * lab.size and (out != lab).sum() == changed
