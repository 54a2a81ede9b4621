"""The decoder's voxel texture tables (models/texture.py): fitting, inversion, sampling, wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidegen.config import AutoencoderConfig
from guidegen.models.autoencoder import AnatomyAwareAutoencoder
from guidegen.models.texture import VoxelTexture, fit_texture_tables


def test_quantile_inverts_the_table_linearly_between_its_levels_hand_case():
    tex = VoxelTexture(num_classes=2, bins=1, quantiles=4)
    tex.table[1, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # at levels 0.125, 0.375, 0.625, 0.875
    labels = torch.ones(5, dtype=torch.long)
    u = torch.tensor([0.0, 0.125, 0.25, 0.5, 1.0])
    got = tex.quantile(labels, torch.zeros_like(labels), u)
    # u = 0 and 1 clamp to the end entries; 0.25 lies halfway between the first two levels
    assert got.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.5, 3.0])
    assert tex.quantile(torch.zeros_like(labels), torch.zeros_like(labels), u).abs().sum() == 0  # class 0: no table


def test_bins_count_the_class_edges_strictly_below_like_searchsorted_left():
    tex = VoxelTexture(num_classes=2, bins=3, quantiles=2)
    tex.edges[0] = torch.tensor([-0.5, 0.5])
    tex.edges[1] = torch.tensor([0.0, 0.1])
    decoded = torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.7, 0.05]).view(1, 1, 6, 1, 1)
    labels = torch.tensor([0, 0, 0, 0, 0, 1]).view(1, 6, 1, 1)
    got = tex.bins_of(decoded, labels).flatten().tolist()
    want = [int(np.searchsorted(tex.edges[k].numpy(), v, side="left"))
            for k, v in zip(labels.flatten().tolist(), decoded.flatten().tolist())]
    assert got == want == [0, 0, 1, 1, 2, 1]


def test_fit_tables_per_class_and_level_with_pooled_fallback_and_unseen_classes():
    n = 400
    decoded = np.concatenate([np.full(n, -0.5), np.full(n, 0.5), np.zeros(10)])
    resid = np.concatenate([np.full(n, 0.1), np.full(n, -0.2), np.linspace(-1, 1, 10)])
    labels = np.concatenate([np.ones(2 * n, int), np.full(10, 3)])
    target = decoded + resid
    edges, table = fit_texture_tables([(decoded, target, labels, np.zeros_like(labels))], num_classes=5, bins=2, quantiles=8,
                                      min_count=20)
    assert edges.shape == (5, 1) and table.shape == (5, 2, 8)
    assert float(edges[1, 0]) == pytest.approx(0.0)  # the class's median level
    assert torch.allclose(table[1, 0], torch.full((8,), 0.1)) and torch.allclose(table[1, 1], torch.full((8,), -0.2))
    # class 3: 10 voxels all at one level, fewer than min_count in each range → the pooled quantiles
    pooled = np.quantile(np.linspace(-1, 1, 10), (np.arange(8) + 0.5) / 8)
    assert np.allclose(table[3, 0].numpy(), pooled) and np.allclose(table[3, 1].numpy(), pooled)
    assert not table[[0, 2, 4]].any() and not edges[[0, 2, 4]].any()  # never seen: no texture


def test_fit_keeps_at_most_per_group_case_voxels_of_a_group_per_case():
    rng = np.random.default_rng(0)
    decoded = np.zeros(5000)
    target = rng.normal(0, 1, 5000)
    labels = np.ones(5000, int)
    _, full = fit_texture_tables([(decoded, target, labels, labels * 0)], 2, 1, 4, per_group_case=5000)
    _, sub = fit_texture_tables([(decoded, target, labels, labels * 0)], 2, 1, 4, per_group_case=500)
    _, sub2 = fit_texture_tables([(decoded, target, labels, labels * 0)], 2, 1, 4, per_group_case=500)
    assert torch.equal(sub, sub2)  # the subset is seeded
    assert not torch.equal(full, sub) and torch.allclose(full, sub, atol=0.2)


def test_sampling_is_seeded_and_draws_the_tables_distribution():
    tex = VoxelTexture(num_classes=2, bins=2, quantiles=64)
    rng = np.random.default_rng(1)
    # class 1: two tissues below the edge (residual -0.4 or +0.2, 30 / 70 %), one above (+0.05)
    lo = np.where(rng.random(20000) < 0.3, -0.4, 0.2)
    dec = np.concatenate([np.full(20000, -0.3), np.full(20000, 0.3)])
    tgt = dec + np.concatenate([lo, np.full(20000, 0.05)])
    edges, table = fit_texture_tables([(dec, tgt, np.ones(40000, int), np.zeros(40000, int))], 2, 2, 64)
    tex.edges.copy_(edges)
    tex.table.copy_(table)
    decoded = torch.tensor([-0.3] * 5000 + [0.3] * 5000).view(1, 1, 10000, 1, 1)
    labels = torch.ones(1, 10000, 1, 1, dtype=torch.long)
    depth = torch.zeros_like(labels)
    a = tex.sample(decoded, labels, depth, torch.Generator().manual_seed(0))
    b = tex.sample(decoded, labels, depth, torch.Generator().manual_seed(0))
    c = tex.sample(decoded, labels, depth, torch.Generator().manual_seed(1))
    assert a.shape == decoded.shape and torch.equal(a, b) and not torch.equal(a, c)
    low, high = a.flatten()[:5000], a.flatten()[5000:]
    assert float((low < -0.1).float().mean()) == pytest.approx(0.3, abs=0.03)
    assert float(low.median()) == pytest.approx(0.2, abs=1e-4) and float(high.median()) == pytest.approx(0.05, abs=1e-4)


def test_autoencoder_texture_is_a_no_op_until_fitted_and_adds_draws_after():
    torch.manual_seed(0)
    ae = AnatomyAwareAutoencoder(4, channels=(4, 8), label_embed_dim=2, texture_bins=2, texture_quantiles=4)
    assert {"texture.edges", "texture.table"} <= set(ae.state_dict())
    decoded = torch.zeros(1, 1, 4, 4, 4)
    labels = torch.full((1, 4, 4, 4), 2)
    assert not ae.has_texture and torch.equal(ae.add_texture(decoded, labels), decoded)
    ae.texture.table[2] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert ae.has_texture and torch.allclose(ae.add_texture(decoded, labels), torch.ones_like(decoded))
    assert AnatomyAwareAutoencoder(4, channels=(4, 8), label_embed_dim=2).texture is None
    with pytest.raises(ValueError, match="texture_bins needs inject_labels"):
        AnatomyAwareAutoencoder(4, channels=(4, 8), inject_labels=False, texture_bins=2)
    with pytest.raises(Exception, match="texture_bins needs inject_labels"):
        AutoencoderConfig(texture_bins=2, inject_labels=False)


def test_groups_split_classes_by_depth_clipped_at_the_deepest():
    tex = VoxelTexture(num_classes=3, bins=1, quantiles=2, depths=3)
    assert tex.table.shape == (9, 1, 2) and tex.edges.shape == (9, 0)
    labels = torch.tensor([0, 1, 1, 1, 2])
    depth = torch.tensor([0, 0, 1, 5, 2])
    assert tex.groups_of(labels, depth).tolist() == [0, 3, 4, 5, 8]
    # one depth: the layout of a texture without depth (class = group), so older tables load
    assert VoxelTexture(num_classes=3, bins=4, quantiles=2).table.shape == (3, 4, 2)


def test_fit_by_depth_separates_border_from_interior_and_deeper_falls_back_to_the_depth_above():
    n = 300
    # class 1: border voxels (depth 0) carry residual -0.3, interior ones (depth 1) +0.1, all at one level
    decoded = np.zeros(2 * n + 10)
    resid = np.concatenate([np.full(n, -0.3), np.full(n, 0.1), np.full(10, 0.5)])
    labels = np.concatenate([np.ones(2 * n, int), np.full(10, 2)])
    depth = np.concatenate([np.zeros(n, int), np.ones(n, int), np.zeros(10, int)])
    edges, table = fit_texture_tables([(decoded, decoded + resid, labels, depth)], num_classes=3, bins=1,
                                      quantiles=4, depths=3, min_count=20)
    assert table.shape == (9, 1, 4)
    assert torch.allclose(table[3], torch.full((1, 4), -0.3)) and torch.allclose(table[4], torch.full((1, 4), 0.1))
    assert torch.equal(table[5], table[4])  # class 1 never seen at depth 2: as depth 1
    # class 2: 10 border voxels (< min_count) keep their own pooled table; its deeper groups copy it
    assert torch.allclose(table[6], torch.full((1, 4), 0.5)) and torch.equal(table[7], table[6]) and torch.equal(table[8], table[6])
    assert not table[:3].any()  # class 0 never seen at any depth


def test_autoencoder_draws_border_and_interior_voxels_from_their_depths_tables():
    ae = AnatomyAwareAutoencoder(3, channels=(4, 8), label_embed_dim=2, texture_bins=1, texture_quantiles=2,
                                 texture_depths=2)
    labels = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    labels[:, 1:5, 1:5, 1:5] = 1  # a 4³ cube: its 2³ core is depth 1, the rest of it depth 0 (border)
    depth = ae.texture_depth(labels)
    assert int((depth[labels == 1] == 1).sum()) == 8 and int((depth[labels == 1] == 0).sum()) == 56
    ae.texture.table[2] = -1.0  # class 1, border
    ae.texture.table[3] = 1.0  # class 1, interior
    out = ae.add_texture(torch.zeros(1, 1, 6, 6, 6), labels)[0, 0]
    assert torch.equal(out[(labels[0] == 1) & (depth[0] == 1)], torch.ones(8))
    assert torch.equal(out[(labels[0] == 1) & (depth[0] == 0)], -torch.ones(56))
    assert not out[labels[0] == 0].any()  # class 0: no table measured


# -- grain: a Gaussian copula over the tables (neighbouring draws correlated, marginals unchanged)

def test_grain_kernel_lag1_correlation_hand_case_and_solution():
    from guidegen.models.texture import MAX_GRAIN, grain_kernel, kernel_lag1

    # [c, 1, c]: Σ w_i w_(i+1) = 2c, Σ w_i² = 1 + 2c²; c = 0.5 → 1 / 1.5
    assert kernel_lag1(torch.tensor([0.5, 1.0, 0.5])) == pytest.approx(2 / 3)
    assert kernel_lag1(torch.tensor([3.0])) == 0.0
    for rho in (0.05, 0.14, 0.36, 0.7, 0.9):
        k = grain_kernel(rho)
        assert kernel_lag1(k) == pytest.approx(rho, abs=1e-5)
        assert float(k.square().sum()) == pytest.approx(1.0, abs=1e-5)  # filtered unit noise keeps unit variance
        assert torch.allclose(k, k.flip(0))  # symmetric
    assert torch.equal(grain_kernel(0.0), torch.ones(1)) and torch.equal(grain_kernel(-0.3), torch.ones(1))
    assert kernel_lag1(grain_kernel(0.999)) == pytest.approx(MAX_GRAIN, abs=1e-5)


def test_correlated_normal_has_unit_variance_up_to_the_edges_and_the_asked_correlation_per_axis():
    from guidegen.models.texture import correlated_normal, grain_kernel

    rhos = (0.0, 0.3, 0.6)
    z = correlated_normal((40, 24, 24, 24), [grain_kernel(r) for r in rhos], torch.Generator().manual_seed(0))
    assert z.shape == (40, 24, 24, 24)
    assert float(z.var()) == pytest.approx(1.0, abs=0.02)
    assert float(z[:, :, :, 0].var()) == pytest.approx(1.0, abs=0.05)  # no loss at the border (drawn with margins)
    for axis, rho in enumerate(rhos, start=1):
        n = z.shape[axis]
        a, b = z.narrow(axis, 0, n - 1).flatten(), z.narrow(axis, 1, n - 1).flatten()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) == pytest.approx(rho, abs=0.02)


def test_cdf_inverts_quantile_including_runs_of_equal_entries_and_the_clamped_tails():
    tex = VoxelTexture(num_classes=2, bins=1, quantiles=4)
    tex.table[1, 0] = torch.tensor([0.0, 1.0, 1.0, 3.0])  # levels 0.125, 0.375, 0.625, 0.875
    g = torch.ones(6, dtype=torch.long)
    b = torch.zeros_like(g)
    u = tex.cdf(g, b, torch.tensor([0.0, 0.5, 1.0, 2.0, -5.0, 9.0]))
    # 0.5 halfway between levels 0.125 and 0.375; 1.0 on the run (0.375, 0.625) → its middle 0.5;
    # 2.0 halfway between 0.625 and 0.875; beyond the ends clamped to 0.5/Q and 1 - 0.5/Q
    assert u.tolist() == pytest.approx([0.125, 0.25, 0.5, 0.75, 0.125, 0.875])
    u2 = torch.tensor([0.2, 0.3, 0.7, 0.8])
    assert tex.cdf(g[:4], b[:4], tex.quantile(g[:4], b[:4], u2)).tolist() == pytest.approx(u2.tolist())
    assert torch.equal(tex.cdf(g, b, torch.tensor([0.0, 0.5, 1.0, 2.0, -5.0, 9.0]), chunk=4), u)  # taken in chunks: the same


def _fitted_texture(seed: int = 0) -> tuple[VoxelTexture, tuple]:
    """A texture fitted to one class whose residuals are a smooth field (lag-1 ≈ 0.5 along x, white along y, z)."""
    from guidegen.models.texture import correlated_normal, grain_kernel

    gen = torch.Generator().manual_seed(seed)
    shape = (1, 32, 32, 32)
    resid = 0.1 * correlated_normal(shape, [grain_kernel(0.5), torch.ones(1), torch.ones(1)], gen)[0].numpy()
    decoded = np.zeros(shape[1:], np.float32)
    labels = np.ones(shape[1:], np.int64)
    labels[:, :, :2] = 0  # a slab of air that the measurement ignores
    case = (decoded, decoded + np.exp(resid), labels, np.zeros_like(labels))  # a skewed marginal: the copula is rank-based
    tex = VoxelTexture(num_classes=2, bins=1, quantiles=64)
    edges, table = fit_texture_tables([case], 2, 1, 64)
    tex.edges.copy_(edges)
    tex.table.copy_(table)
    return tex, case


def test_measure_grain_finds_the_residuals_correlation_per_axis():
    from guidegen.models.texture import measure_grain

    tex, case = _fitted_texture()
    grain = measure_grain(tex, [case])
    assert grain.shape == (3,)
    assert float(grain[0]) == pytest.approx(0.5, abs=0.05)
    assert abs(float(grain[1])) < 0.05 and abs(float(grain[2])) < 0.05


def test_grain_draws_keep_the_tables_marginals_and_reproduce_the_measured_correlation():
    from guidegen.models.texture import measure_grain

    tex, (decoded, _, labels, depth) = _fitted_texture()
    dec = torch.from_numpy(decoded)[None, None]
    lab = torch.from_numpy(labels)[None]
    dep = torch.from_numpy(depth)[None]
    white = tex.sample(dec, lab, dep, torch.Generator().manual_seed(3))
    assert torch.equal(white, tex.sample(dec, lab, dep, torch.Generator().manual_seed(3)))
    # zero grain draws u exactly as before grain existed: torch.rand with the same generator
    u = torch.rand(lab.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(white[:, 0], tex.quantile(tex.groups_of(lab, dep), tex.bins_of(dec, lab), u).to(white.dtype))
    tex.grain.copy_(torch.tensor([0.5, 0.0, 0.2]))
    grainy = tex.sample(dec, lab, dep, torch.Generator().manual_seed(3))
    assert torch.equal(grainy, tex.sample(dec, lab, dep, torch.Generator().manual_seed(3)))  # seeded
    inside = lab[0] == 1
    # same marginal: the quantiles of the draws agree with the white draws'
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(grainy[0, 0][inside].quantile(q), white[0, 0][inside].quantile(q), atol=0.03)
    case = (decoded, (dec + grainy)[0, 0].numpy(), labels, depth)
    got = measure_grain(tex, [case])
    assert got.tolist() == pytest.approx([0.5, 0.0, 0.2], abs=0.05)
    white_case = (decoded, (dec + white)[0, 0].numpy(), labels, depth)
    assert measure_grain(tex, [white_case]).abs().max() < 0.05


def test_checkpoint_without_grain_loads_as_white_and_with_grain_round_trips(tmp_path):
    from safetensors.torch import save_file

    from guidegen.training.trainer import load_model_weights

    ae = AnatomyAwareAutoencoder(4, channels=(4, 8), label_embed_dim=2, texture_bins=2, texture_quantiles=4)
    ae.texture.grain.copy_(torch.tensor([0.1, 0.2, 0.3]))
    state = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = AnatomyAwareAutoencoder(4, channels=(4, 8), label_embed_dim=2, texture_bins=2, texture_quantiles=4)
    load_model_weights(fresh, tmp_path)
    assert fresh.texture.grain.tolist() == pytest.approx([0.1, 0.2, 0.3])
    older = tmp_path / "older"
    older.mkdir()
    save_file({k: v for k, v in state.items() if k != "texture.grain"}, str(older / "model.safetensors"))
    fresh.texture.grain.fill_(0.7)
    fresh2 = AnatomyAwareAutoencoder(4, channels=(4, 8), label_embed_dim=2, texture_bins=2, texture_quantiles=4)
    load_model_weights(fresh2, older)  # strict load: only the grain may be missing
    assert not fresh2.texture.grain.any()
    save_file({k: v for k, v in state.items() if k != "texture.table"}, str(older / "model.safetensors"))
    with pytest.raises(Exception, match="texture.table"):
        load_model_weights(fresh2, older)
