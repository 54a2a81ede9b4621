"""Stage 2: anatomy-aware HDR autoencoder, its losses, tiling and training task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guidegen.config import AutoencoderConfig, load_config
from guidegen.errors import GuideGenError
from guidegen.models.autoencoder import (
    AnatomyAwareAutoencoder,
    DiagonalGaussian,
    hu_to_norm,
    measure_latent_scale,
    norm_to_hu,
)
from guidegen.models.discriminators import multi_window, random_slices
from guidegen.models.tiling import ramp_weight, receptive_radius, tile_starts, tiled_decode, tiled_encode
from guidegen.training.ae_losses import (
    RANDOM_CENTER_HU,
    RANDOM_WIDTH_HU,
    WINDOW_FAMILIES,
    AutoencoderLoss,
    adaptive_weight,
    class_balanced_l1,
    class_distribution_l1,
    class_mean_l1,
    disc_layers_for,
    apply_window,
    hinge_d_loss,
    hinge_g_loss,
    random_window,
    window_to_norm,
)

K = 22
TINY = dict(channels=(4, 8, 8), label_embed_dim=4)


def tiny_model(seed: int = 0, **kw) -> AnatomyAwareAutoencoder:
    torch.manual_seed(seed)
    return AnatomyAwareAutoencoder(K, **{**TINY, **kw})


def rand_case(shape=(1, 16, 16, 24), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ct = torch.rand(shape[0], 1, *shape[1:], generator=g) * 2 - 1
    labels = torch.randint(0, K, shape, generator=g)
    return ct, labels


def phantom_like(b: int = 1, grid=(16, 16, 24), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth synthetic torso: air, a body ellipse (soft tissue), lungs (-850), a spine (700) + noise."""
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in grid], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    lung = ((x.abs() - 0.4) / 0.25) ** 2 + (y / 0.35) ** 2 + ((z - 0.5) / 0.5) ** 2 < 1
    spine = (x / 0.12) ** 2 + ((y + 0.4) / 0.12) ** 2 < 1
    labels = torch.zeros(grid, dtype=torch.long)
    hu = torch.full(grid, -1000.0)
    labels[body], hu[body] = 21, 40.0
    labels[lung & body], hu[lung & body] = 6, -850.0
    labels[spine], hu[spine] = 12, 700.0
    g = torch.Generator().manual_seed(seed)
    hu = hu[None, None].repeat(b, 1, 1, 1, 1) + 20 * torch.randn(b, 1, *grid, generator=g)
    return hu, labels[None].repeat(b, 1, 1, 1)


# ----------------------------------------------------------------------------------- model
def test_shapes_anisotropic_grid():
    m = tiny_model()
    ct, labels = rand_case((2, 16, 16, 24))
    post = m.encode(ct, labels)
    assert post.mean.shape == (2, 4, 4, 4, 6) and post.logvar.shape == (2, 4, 4, 4, 6)
    assert post.sample(torch.Generator().manual_seed(0)).shape == (2, 4, 4, 4, 6)
    out = m.decode(post.mode(), labels)
    assert out.shape == (2, 1, 16, 16, 24)
    recon, post2 = m(ct, labels)
    assert recon.shape == ct.shape and torch.isfinite(recon).all()
    assert m.downsample_factor == 4 and float(m.latent_scale) == 1.0


def test_from_config_and_demo_defaults():
    cfg = load_config("demo").autoencoder
    m = AnatomyAwareAutoencoder.from_config(cfg, K)
    assert m.latent_channels == cfg.latent_channels == 4 and m.inject_labels
    assert [b[0].conv2.out_channels for b in m.encoder.blocks] == list(cfg.channels)


def test_label_injection_changes_output_and_ablation_ignores_labels():
    ct, labels = rand_case()
    other = (labels + 1) % K
    m = tiny_model().eval()
    with torch.no_grad():
        z = m.encode(ct, labels).mode()
        assert not torch.allclose(z, m.encode(ct, other).mode())
        assert (m.decode(z, labels) - m.decode(z, other)).abs().mean() > 1e-4
    m0 = tiny_model(inject_labels=False).eval()
    with torch.no_grad():
        z0 = m0.encode(ct, labels).mode()
        assert torch.equal(z0, m0.encode(ct, other).mode())
        assert torch.equal(m0.decode(z0, labels), m0.decode(z0, None))
    assert sum(p.numel() for p in m0.parameters()) < sum(p.numel() for p in m.parameters())


def test_label_pyramid_area_resampling_keeps_thin_structures():
    m = tiny_model()
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    labels[0, 5, :, :] = 20  # a one-voxel-thick tumour sheet: nearest ×4 downsampling could drop it
    pyr = m.labels(labels)
    assert [p.shape[2:] for p in pyr] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    bg, tumour = m.labels.embed.weight[0], m.labels.embed.weight[20]
    expected = 0.25 * tumour + 0.75 * bg  # block x∈[4, 8) holds one tumour slice of four
    torch.testing.assert_close(pyr[2][0, :, 1, 0, 0], expected)


def test_freeze_encoder_stops_gradients_to_the_latent_space_only():
    model = tiny_model()
    model.freeze_encoder()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.", "labels.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder."))
    hu, lab = phantom_like()
    recon, _ = model(hu_to_norm(hu), lab)
    recon.mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert model.decoder.conv_out.weight.grad is not None


def test_label_readout_starts_neutral_and_reads_each_class_with_its_own_weights():
    ct, labels = rand_case()
    plain, readout = tiny_model(seed=3), tiny_model(seed=3, label_readout=True)
    assert set(readout.state_dict()) - set(plain.state_dict()) == {"decoder.readout.proj.weight", "decoder.readout.proj.bias"}
    readout.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        z = plain.encode(ct, labels).mode()
        base = plain.decode(z, labels)
        assert torch.equal(readout.decode(z, labels), base)  # zero-initialised: output unchanged
        # class 5 gets bias 0.5 and weight w on the features, every other class stays as it was
        w = torch.arange(1.0, 5.0)
        readout.decoder.readout.proj.bias[5] = 0.5
        readout.decoder.readout.proj.weight[5, :, 0, 0, 0] = w
        out = readout.decode(z, labels)
    feats = {}
    readout.decoder.norm_out.register_forward_hook(lambda mod, inp, o: feats.setdefault("h", torch.nn.functional.silu(o)))
    with torch.no_grad():
        readout.decode(z, labels)
    mask = (labels == 5).unsqueeze(1)
    expected = base + mask * (0.5 + (feats["h"] * w.view(1, 4, 1, 1, 1)).sum(1, keepdim=True))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="inject_labels"):
        tiny_model(label_readout=True, inject_labels=False)


def test_structure_depth_is_a_chebyshev_erosion_count_hand_case():
    from guidegen.models.autoencoder import structure_depth

    # 1-D: five voxels of 0 then four of 1; the volume's own ends are not borders
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1]).view(1, 9, 1, 1)
    assert structure_depth(labels, 3)[0, :, 0, 0].tolist() == [3, 3, 2, 1, 0, 0, 1, 2, 3]
    assert structure_depth(labels, 1)[0, :, 0, 0].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 1]
    # 3-D: one voxel of class 2 inside a 9³ block of class 1 is a border in every direction,
    # diagonals included: depth = Chebyshev distance to it minus 1, clipped at R
    labels = torch.ones(1, 9, 9, 9, dtype=torch.long)
    labels[0, 4, 4, 4] = 2
    cheb = torch.stack(torch.meshgrid(*[torch.arange(9) - 4] * 3, indexing="ij")).abs().amax(0)
    expected = (cheb - 1).clamp(0, 2)
    assert torch.equal(structure_depth(labels, 2)[0], expected)


def test_label_depth_starts_neutral_and_reads_one_map_per_class_and_depth():
    ct, _ = rand_case()
    labels = torch.full((1, 16, 16, 24), 1, dtype=torch.long)
    labels[:, 4:12, 4:12, 6:18] = 7  # a block of class 7, 4 voxels deep
    plain, deep = tiny_model(seed=3, label_readout=True), tiny_model(seed=3, label_readout=True, label_depth=3)
    assert set(deep.state_dict()) - set(plain.state_dict()) == {"decoder.readout.depth_weight", "decoder.readout.depth_bias"}
    torch.nn.init.normal_(plain.decoder.readout.proj.weight, std=0.5)  # a trained readout
    deep.load_state_dict(plain.state_dict(), strict=False)
    feats = {}
    deep.decoder.norm_out.register_forward_hook(lambda mod, inp, o: feats.__setitem__("h", torch.nn.functional.silu(o)))
    with torch.no_grad():
        z = plain.encode(ct, labels).mode()
        base = plain.decode(z, labels)
        assert torch.equal(deep.decode(z, labels), base)  # zero-initialised: output unchanged
        # class 7 at depth 2: bias 0.5 and weight w on the features; every other voxel unchanged
        w = torch.arange(1.0, 5.0)
        deep.decoder.readout.depth_bias[7 * 3 + 1] = 0.5
        deep.decoder.readout.depth_weight[7 * 3 + 1] = w
        out = deep.decode(z, labels)
    from guidegen.models.autoencoder import structure_depth

    mask = ((labels == 7) & (structure_depth(labels, 3) == 2)).unsqueeze(1)
    assert 0 < mask.sum() < (labels == 7).sum()
    expected = base + mask * (0.5 + (feats["h"] * w.view(1, 4, 1, 1, 1)).sum(1, keepdim=True))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="label_readout"):
        tiny_model(label_depth=2)
    with pytest.raises(Exception, match="label_depth needs label_readout"):
        AutoencoderConfig(label_depth=2)


def test_label_readout_config_needs_label_injection():
    with pytest.raises(Exception, match="label_readout needs inject_labels"):
        AutoencoderConfig(label_readout=True, inject_labels=False)
    assert AutoencoderConfig(label_readout=True).label_readout


def test_loading_an_earlier_checkpoint_may_lack_only_the_declared_new_modules(tmp_path):
    from safetensors.torch import save_file

    from guidegen.training.trainer import load_model_weights

    plain = tiny_model(seed=1)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "model.safetensors"))
    readout = tiny_model(seed=2, label_readout=True)
    with pytest.raises(GuideGenError, match="missing.*decoder.readout"):
        load_model_weights(readout, tmp_path)  # strict by default
    load_model_weights(readout, tmp_path, may_lack=readout.INIT_MAY_LACK)
    for k, v in plain.state_dict().items():
        assert torch.equal(readout.state_dict()[k], v)
    assert not readout.decoder.readout.proj.weight.any()
    deep = tiny_model(seed=2, label_readout=True, label_depth=2)  # both additions at once
    load_model_weights(deep, tmp_path, may_lack=deep.INIT_MAY_LACK)
    assert not deep.decoder.readout.depth_weight.any()
    partial = {k: v.contiguous() for k, v in plain.state_dict().items() if k != "decoder.conv_out.bias"}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(GuideGenError, match="missing.*decoder.conv_out.bias"):  # other gaps still fail
        load_model_weights(readout, tmp_path, may_lack=readout.INIT_MAY_LACK)



def test_texture_tables_of_another_depth_count_reinitialise_under_may_differ_only(tmp_path):
    """--init-from a checkpoint whose texture has another ``texture_depths``: the tables (measured
    at export anyway) start empty; a plain load of the same file names the mismatch."""
    from safetensors.torch import save_file

    from guidegen.training.trainer import load_model_weights

    flat = tiny_model(seed=1, texture_bins=2, texture_quantiles=4)
    flat.texture.table.fill_(0.5)
    save_file({k: v.contiguous() for k, v in flat.state_dict().items()}, str(tmp_path / "model.safetensors"))
    deep = tiny_model(seed=2, texture_bins=2, texture_quantiles=4, texture_depths=3)
    with pytest.raises(GuideGenError, match="shape mismatch for texture"):
        load_model_weights(deep, tmp_path)
    load_model_weights(deep, tmp_path, may_lack=deep.INIT_MAY_LACK, may_differ=deep.INIT_MAY_DIFFER)
    assert not deep.has_texture and torch.equal(deep.decoder.conv_out.weight, flat.decoder.conv_out.weight)
    with pytest.raises(GuideGenError, match="shape mismatch for texture"):  # may lack is not may differ
        load_model_weights(deep, tmp_path, may_lack=deep.INIT_MAY_LACK)

def test_bad_grid_and_label_shape_raise():
    m = tiny_model()
    with pytest.raises(GuideGenError, match="divisible by 4"):
        m.encode(torch.zeros(1, 1, 16, 16, 18), torch.zeros(1, 16, 16, 18, dtype=torch.long))
    with pytest.raises(GuideGenError, match="label map shape"):
        m.encode(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 16, 16, 8, dtype=torch.long))


# ---------------------------------------------------------------------- HU normalisation
def test_hu_norm_hand_values_clamp_and_round_trip():
    hu = torch.tensor([-2000.0, -1024.0, 512.0, 2048.0, 3000.0, 0.0])
    expected = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0, 1024.0 / 1536.0 - 1.0])
    torch.testing.assert_close(hu_to_norm(hu, (-1024.0, 2048.0)), expected)
    torch.testing.assert_close(norm_to_hu(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])),
                               torch.tensor([-1024.0, -1024.0, 512.0, 2048.0, 2048.0]))
    inside = torch.linspace(-1024, 2048, 101)
    torch.testing.assert_close(norm_to_hu(hu_to_norm(inside)), inside, atol=1e-3, rtol=0)
    arr = np.array([-1200.0, -200.0, 1200.0])  # numpy and a custom range
    np.testing.assert_allclose(hu_to_norm(arr, (-1200.0, 1200.0)), [-1.0, -1.0 / 6.0, 1.0])


# ---------------------------------------------------------------------------- windowing
def test_apply_window_hand_values_and_per_sample():
    x = torch.tensor([-200.0, -100.0, 0.0, 40.0, 240.0, 500.0])
    torch.testing.assert_close(apply_window(x, 40.0, 400.0), torch.tensor([0.0, 0.15, 0.4, 0.5, 1.0, 1.0]))
    vol = torch.zeros(2, 1, 2, 2, 2)
    out = apply_window(vol, torch.tensor([0.0, 100.0]), torch.tensor([100.0, 100.0]))
    assert torch.all(out[0] == 0.5) and torch.all(out[1] == 0.0)


def test_window_in_norm_units_matches_hu():
    hu = torch.linspace(-1024, 2048, 257)
    c, w = torch.tensor([-600.0, 40.0]), torch.tensor([1500.0, 400.0])
    for i in range(2):
        cn, wn = window_to_norm(c[i], w[i], (-1024.0, 2048.0))
        torch.testing.assert_close(apply_window(hu_to_norm(hu), cn, wn), apply_window(hu, c[i], w[i]), atol=1e-5, rtol=0)


def test_random_windows_fall_in_documented_ranges():
    g = torch.Generator().manual_seed(0)
    center, width = random_window(g, 4000, p_random=0.25)
    boxes = [*WINDOW_FAMILIES.values(), (RANDOM_CENTER_HU, RANDOM_WIDTH_HU)]

    def inside(box, c, w):
        (c0, c1), (w0, w1) = box
        return (c0 <= c <= c1) and (w0 <= w <= w1)

    fam_hits = [0] * len(WINDOW_FAMILIES)
    for c, w in zip(center.tolist(), width.tolist()):
        assert any(inside(b, c, w) for b in boxes), (c, w)
        for j, b in enumerate(WINDOW_FAMILIES.values()):
            fam_hits[j] += inside(b, c, w)
    # each family ≈ 0.75/3 = 25 % (plus the rare random window that lands in its box)
    assert all(800 < h < 1250 for h in fam_hits), fam_hits
    assert torch.equal(random_window(torch.Generator().manual_seed(0), 4000)[0], center)  # seeded


def test_disc_layers_fit_the_grid():
    assert disc_layers_for((48, 48, 64)) == 3 and disc_layers_for((16, 16, 24)) == 2 and disc_layers_for((8, 8, 8)) == 1
    loss = AutoencoderLoss.from_config(AutoencoderConfig(), grid=(16, 16, 16))
    hu, _ = phantom_like(grid=(16, 16, 16))
    s, v = loss._adversarial(hu_to_norm(hu), None)
    assert s.numel() > 0 and v.shape[:2] == (1, 1)


def test_multi_window_and_slices():
    x = hu_to_norm(torch.tensor([-1000.0, 40.0, 1150.0]).view(1, 1, 3, 1, 1))
    mw = multi_window(x, (-1024.0, 2048.0))
    assert mw.shape == (1, 3, 3, 1, 1) and mw.min() >= -1 and mw.max() <= 1
    torch.testing.assert_close(mw[0, 1, 1].flatten(), torch.tensor([0.0]), atol=1e-5, rtol=0)  # 40 HU: soft-tissue mid
    assert mw[0, 0, 2].item() == 1.0 and mw[0, 2, 0].item() == -1.0
    vol = torch.randn(2, 3, 8, 10, 12)
    shapes = {tuple(s.shape) for s in random_slices(vol, 20, torch.Generator().manual_seed(1))}
    assert shapes == {(2, 3, 8, 10), (2, 3, 8, 12)}


# ------------------------------------------------------------------------------- losses
def test_kl_standard_normal_is_zero_and_hand_value():
    post = DiagonalGaussian(torch.zeros(2, 8, 3, 3, 3))
    assert torch.equal(post.kl(), torch.zeros(2))
    moments = torch.cat([torch.ones(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2)], 1)
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), torch.tensor([0.5 * 32]))


def test_hinge_losses_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(0.5)=0.5 → 0.25; fake: relu(1-2)=0, relu(1.5)=1.5 → 0.75
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(0.75))


def test_generator_loss_terms_adaptive_weight_and_delayed_start():
    m = tiny_model()
    loss = AutoencoderLoss(disc_start=5, disc_channels=4, disc_layers=2, num_slices=1)
    hu, labels = phantom_like()
    ct = hu_to_norm(hu)
    recon, post = m(ct, labels)
    before = loss.generator_loss(recon, ct, post, step=4, last_layer=m.last_layer_weight)
    assert before["g_adv"] == 0 and before["adv_scale"] == 0 and not loss.disc_active(4)
    expected = before["l1_window"] + 0.2 * before["ssim_window"] + before["l1_full"] + 1e-6 * before["kl"]
    torch.testing.assert_close(before["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    after = loss.generator_loss(recon, ct, post, step=5, last_layer=m.last_layer_weight)
    assert loss.disc_active(5) and torch.isfinite(after["adv_scale"]) and after["adv_scale"] > 0
    after["loss"].backward()
    assert m.last_layer_weight.grad is not None
    assert all(p.grad is None for p in loss.parameters())  # discriminators frozen in the G pass
    assert all(p.requires_grad for p in loss.parameters())  # ... and unfrozen afterwards
    d = loss.discriminator_loss(recon, ct)
    d["loss"].backward()
    assert all(p.grad is not None for p in loss.slice_disc.parameters())
    w = torch.ones(3, requires_grad=True)
    scale = adaptive_weight((2 * w).sum(), (4 * w).sum(), w)  # ‖2‖ / ‖4‖ = 0.5
    torch.testing.assert_close(scale, torch.tensor(0.5), rtol=1e-3, atol=0)


def assert_generator_adds_term(term: str, **weight: float) -> None:
    """``AutoencoderLoss(**weight)`` adds ``weight · terms[term]`` to the generator loss of a tiny
    model on a phantom-like volume, and without the weight the term is not even computed."""
    (name, w), = weight.items()
    m = tiny_model()
    hu, lab = phantom_like()
    ct = hu_to_norm(hu)
    rec, post = m(ct, lab)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    g = AutoencoderLoss(disc_start=10**9, **weight).generator_loss(rec, ct, post, step=0, labels=lab, generator=gen())
    base = AutoencoderLoss(disc_start=10**9).generator_loss(rec, ct, post, step=0, labels=lab, generator=gen())
    assert term in g and term not in base, name  # weight 0: labels not read, term not computed
    torch.testing.assert_close(g["loss"].detach(), base["loss"].detach() + w * g[term], rtol=1e-5, atol=1e-6)


def test_class_balanced_l1_hand_values_and_generator_term():
    target = torch.zeros(1, 1, 2, 2, 1)
    recon = torch.tensor([1.0, 1.0, 1.0, 4.0]).view(1, 1, 2, 2, 1)
    labels = torch.tensor([0, 0, 0, 7]).view(1, 2, 2, 1)
    # class 0: mean |err| 1 over 3 voxels, class 7: 4 over 1 voxel → (1 + 4) / 2; plain L1 is 7/4
    torch.testing.assert_close(class_balanced_l1(recon, target, labels), torch.tensor(2.5))
    one_class = torch.zeros_like(labels)
    torch.testing.assert_close(class_balanced_l1(recon, target, one_class), (recon - target).abs().mean())
    # two samples: classes are averaged per sample, then over all (sample, class) pairs
    two = class_balanced_l1(torch.cat([recon, recon]), torch.cat([target, target]), torch.cat([labels, one_class]))
    torch.testing.assert_close(two, torch.tensor((1 + 4 + 7 / 4) / 3))
    # class weights (K,): tumour-like class 7 weighs 3 → (1·1 + 3·4) / (1 + 3); absent classes do not count
    w = torch.ones(K)
    w[7], w[5] = 3.0, 100.0
    torch.testing.assert_close(class_balanced_l1(recon, target, labels, w), torch.tensor(13 / 4))
    torch.testing.assert_close(class_balanced_l1(recon, target, labels, torch.ones(K)), torch.tensor(2.5))
    assert_generator_adds_term("l1_class", class_l1_weight=2.0)


def test_class_mean_l1_hand_values_and_generator_term():
    target = torch.zeros(1, 1, 2, 2, 1)
    recon = torch.tensor([1.0, -1.0, 2.0, 4.0]).view(1, 1, 2, 2, 1)
    labels = torch.tensor([0, 0, 0, 7]).view(1, 2, 2, 1)
    # class 0: mean error (1 - 1 + 2) / 3 = 2/3 (errors of opposite sign cancel), class 7: 4 → (2/3 + 4) / 2
    torch.testing.assert_close(class_mean_l1(recon, target, labels), torch.tensor((2 / 3 + 4) / 2))
    torch.testing.assert_close(class_balanced_l1(recon, target, labels), torch.tensor((4 / 3 + 4) / 2))
    w = torch.ones(K)
    w[7] = 3.0  # the class weights of the class-balanced L1 apply too
    torch.testing.assert_close(class_mean_l1(recon, target, labels, w), torch.tensor((2 / 3 + 3 * 4) / 4))
    # a reconstruction that is right on average in every class costs nothing, voxel errors or not
    zero_mean = torch.tensor([1.0, -1.0, 0.0, 0.0]).view(1, 1, 2, 2, 1)
    assert float(class_mean_l1(zero_mean, target, labels)) == 0.0 < float(class_balanced_l1(zero_mean, target, labels))
    assert_generator_adds_term("l1_class_mean", class_mean_weight=3.0)


def test_class_distribution_l1_hand_values_brute_force_and_generator_term():
    labels = torch.tensor([0, 0, 0, 7]).view(1, 2, 2, 1)
    target = torch.tensor([0.0, 1.0, 2.0, 5.0]).view(1, 1, 2, 2, 1)
    # class 0 holds the right values in the wrong voxels: no cost (the voxel L1 has 4/3); class 7: 4
    recon = torch.tensor([2.0, 0.0, 1.0, 9.0]).view(1, 1, 2, 2, 1)
    torch.testing.assert_close(class_distribution_l1(recon, target, labels), torch.tensor((0 + 4) / 2))
    # sorted class 0: [0, 1, 3] vs [0, 1, 2] → 1/3; class 7 right
    recon = torch.tensor([3.0, 0.0, 1.0, 5.0]).view(1, 1, 2, 2, 1)
    torch.testing.assert_close(class_distribution_l1(recon, target, labels), torch.tensor((1 / 3 + 0) / 2))
    w = torch.ones(K)
    w[0] = 2.0
    torch.testing.assert_close(class_distribution_l1(recon, target, labels, w), torch.tensor((2 / 3 + 0) / 3))
    # brute force on random volumes: per (sample, class) mean |sorted - sorted|, classes interleaved
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 4, 4, 3), generator=g)
    recon, target = torch.randn(2, 1, 4, 4, 3, generator=g), torch.randn(2, 1, 4, 4, 3, generator=g) * 3
    expect = [float((recon[b, 0][labels[b] == c].sort().values - target[b, 0][labels[b] == c].sort().values).abs().mean())
              for b in range(2) for c in range(5) if (labels[b] == c).any()]
    recon.requires_grad_(True)
    got = class_distribution_l1(recon, target, labels)
    assert abs(float(got.detach()) - np.mean(expect)) < 1e-5
    got.backward()
    assert recon.grad is not None and bool(recon.grad.abs().sum() > 0)
    # it bounds the class-mean term from above
    assert float(class_mean_l1(recon.detach(), target, labels)) <= float(got.detach()) + 1e-6
    assert_generator_adds_term("w1_class", class_distribution_weight=2.0)


def test_window_l1_class_balanced_averages_each_class_inside_the_window():
    target = hu_to_norm(torch.zeros(1, 1, 8, 8, 8))  # all 0 HU
    recon_hu = torch.full((1, 1, 8, 8, 8), 10.0)
    recon_hu[0, 0, 4, 4, 4] = 100.0
    recon = hu_to_norm(recon_hu)
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[0, 4, 4, 4] = 7  # a one-voxel class with a large error
    seen_contrast = 0
    for seed in range(8):  # windows are random: some clamp 0 and 100 HU alike
        terms = AutoencoderLoss(window_class_balanced=True).reconstruction_terms(
            recon, target, torch.Generator().manual_seed(seed), labels)
        c, w = window_to_norm(*random_window(torch.Generator().manual_seed(seed), 1), (-1024.0, 2048.0))
        win_r, win_t = apply_window(recon, c, w), apply_window(target, c, w)
        torch.testing.assert_close(terms["l1_window"], class_balanced_l1(win_r, win_t, labels))
        plain = AutoencoderLoss().reconstruction_terms(recon, target, torch.Generator().manual_seed(seed), labels)
        torch.testing.assert_close(plain["l1_window"], (win_r - win_t).abs().mean())
        if plain["l1_window"] > 0:  # the one-voxel class with the large error counts half, not 1/512
            seen_contrast += 1
            assert terms["l1_window"] > 2 * plain["l1_window"]
    assert seen_contrast >= 2


def test_class_window_centres_on_a_present_class():
    from guidegen.training.ae_losses import CLASS_WINDOW_WIDTH_HU, class_window

    ct = torch.full((1, 1, 8, 8, 8), 40.0)
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    ct[0, 0, 4, 4, 4], labels[0, 4, 4, 4] = -20.0, 20  # a one-voxel "tumour" at -20 HU in a 40 HU organ
    ct[0, 0, 4, 4, 5] = -10.0  # another organ voxel: the organ's mean is (511·40 - 10) / 511
    gen = torch.Generator().manual_seed(0)
    centres = [class_window(ct, labels, gen) for _ in range(40)]
    seen = {round(float(c[0]), 3) for c, _ in centres}
    assert seen == {-20.0, round((510 * 40.0 - 10.0) / 511, 3)}  # both classes drawn, each at its mean
    assert all(CLASS_WINDOW_WIDTH_HU[0] <= float(w[0]) <= CLASS_WINDOW_WIDTH_HU[1] for _, w in centres)
    # with class_window_prob 1 every loss window is one of these (same draws from the generator)
    loss = AutoencoderLoss(class_window_prob=1.0, window_class_balanced=True)
    x = hu_to_norm(ct)
    terms = loss.reconstruction_terms(x + 0.01, x, torch.Generator().manual_seed(1), labels)
    assert terms["l1_window"] > 0.01 * 3072 / 2 / 500  # a ≤ 500 HU window: steeper than the full range


def test_class_window_batch_equals_per_sample_brute_force():
    from guidegen.training.ae_losses import class_window

    g = torch.Generator().manual_seed(5)
    ct = torch.randn(3, 1, 6, 6, 6, generator=g) * 100
    labels = torch.randint(0, 5, (3, 6, 6, 6), generator=g)
    labels[1] = torch.where(labels[1] == 3, 4, labels[1])  # sample 1 lacks class 3
    for seed in range(6):
        center, width = class_window(ct, labels, torch.Generator().manual_seed(seed))
        u = torch.rand(3, 2, generator=torch.Generator().manual_seed(seed))  # the same draws
        for i in range(3):
            ids = labels[i].unique()
            cls = ids[min(int(u[i, 0] * len(ids)), len(ids) - 1)]
            assert float(center[i]) == pytest.approx(float(ct[i, 0][labels[i] == cls].double().mean()), abs=1e-3)


def test_random_crop_focus_centres_on_small_classes():
    from guidegen.training.autoencoder import random_crop

    ct = torch.arange(16 * 16 * 16, dtype=torch.float32).view(1, 1, 16, 16, 16)
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    labels[0, 14, 1, 9] = 20  # one tumour voxel near a corner
    torch.manual_seed(0)
    for _ in range(10):
        c, lab = random_crop(ct, labels, (8, 8, 8), focus_prob=1.0, focus_ids=(20,))
        assert c.shape == (1, 1, 8, 8, 8) and lab.shape == (1, 8, 8, 8)
        assert (lab == 20).sum() == 1  # always in the crop, window shifted inside the volume
        idx = (lab[0] == 20).nonzero()[0]
        assert c[0, 0, idx[0], idx[1], idx[2]] == ct[0, 0, 14, 1, 9]  # CT and labels cut alike
    # absent focus class → uniform crop; uniform crops of this volume rarely hold that voxel
    hits = sum(int((random_crop(ct, labels, (8, 8, 8), focus_prob=1.0, focus_ids=(3,))[1] == 20).any())
               for _ in range(40))
    assert hits < 30
    torch.manual_seed(5)
    a = random_crop(ct, labels, (8, 8, 8), focus_prob=0.5, focus_ids=(20,))
    torch.manual_seed(5)
    b = random_crop(ct, labels, (8, 8, 8), focus_prob=0.5, focus_ids=(20,))
    assert torch.equal(a[0], b[0])  # torch's RNG drives every draw: resumable


# ------------------------------------------------------------------------------- tiling
def test_tile_starts_and_ramp():
    assert tile_starts(96, 64, 48) == [0, 16, 32]
    assert tile_starts(48, 64, 16) == [0]
    assert tile_starts(100, 40, 8) == [0, 32, 60]
    w = ramp_weight(16, 8, True, False)
    assert w[:3].max() <= 1e-6 and w[-8:].min() == 1.0 and torch.all(w[1:] >= w[:-1])
    assert torch.equal(ramp_weight(8, 8, False, False), torch.ones(8))


@pytest.mark.parametrize("label_readout,label_depth", [(False, 0), (True, 0), (True, 3)])
def test_tiled_decode_is_exact_when_margin_covers_receptive_field(label_readout, label_depth):
    m = tiny_model(label_readout=label_readout, label_depth=label_depth).eval()
    if label_readout:  # a trained (non-zero) per-class readout is exactly local too
        torch.nn.init.normal_(m.decoder.readout.proj.weight, std=0.5)
    if label_depth:  # and so are trained maps per depth
        torch.nn.init.normal_(m.decoder.readout.depth_weight, std=0.5)
    radius = receptive_radius(m)
    assert 12 + label_depth <= radius <= 24 + label_depth
    overlap = 4 * -(-int(np.ceil(radius * 8 / 3)) // 4)  # 3/8 of the overlap ≥ radius
    g = torch.Generator().manual_seed(3)
    n = 2 * overlap + 16
    z = torch.randn(1, 4, n // 4, 2, 2, generator=g)
    # blocks of 4 voxels along X, so structures have an inside for the depth features to see
    labels = torch.randint(0, K, (1, n // 4, 8, 8), generator=g).repeat_interleave(4, dim=1)
    with torch.no_grad():
        full = m.decode(z, labels)
        tiled = tiled_decode(m, z, labels, tile=(overlap + 16, 8, 8), overlap=(overlap, 0, 0))
    assert len(tile_starts(n, overlap + 16, overlap)) >= 3
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)


def test_shipped_autoencoder_tiled_equals_untiled_on_96_cubed_phantom():
    """Issue 7: tiled decode within 2 HU (mean) of untiled on a 96³ volume, real weights and anatomy."""
    from guidegen.checkpoints import shipped_root
    from guidegen.data.latents import load_autoencoder
    from guidegen.data.phantom import render_phantom

    ae, cfg, _ = load_autoencoder(shipped_root() / "demo" / "autoencoder")
    case = render_phantom(7, (96, 96, 96))
    ct = hu_to_norm(torch.from_numpy(case.ct.astype(np.float32))[None, None], tuple(cfg.autoencoder.hu_range))
    labels = torch.from_numpy(case.labels.astype(np.int64))[None]
    with torch.inference_mode():
        z = ae.encode(ct, labels).mode()
        full = norm_to_hu(ae.decode(z, labels), tuple(cfg.autoencoder.hu_range))
        tiled = norm_to_hu(tiled_decode(ae, z, labels, tile=64, overlap=32), tuple(cfg.autoencoder.hu_range))
    assert len(tile_starts(96, 64, 32)) == 2  # 2×2×2 overlapping tiles
    err = (tiled - full).abs()
    assert err.mean() < 2.0, f"tiled vs untiled mean error {err.mean():.2f} HU"
    assert full.std() > 100  # a real CT-like output, not a constant


def test_tiled_decode_and_encode_close_to_untiled_3d():
    m = tiny_model().eval()
    ct, labels = rand_case((1, 56, 56, 56), seed=4)  # 2×2×2 tiles of 48³
    with torch.no_grad():
        post = m.encode(ct, labels)
        full = norm_to_hu(m.decode(post.mode(), labels))
        tiled = norm_to_hu(tiled_decode(m, post.mode(), labels, tile=48, overlap=40))
        post_t = tiled_encode(m, ct, labels, tile=48, overlap=40)
    err = (tiled - full).abs()
    assert err.mean() < 2.0, err.mean()  # HU
    assert (post_t.mean - post.mean).abs().mean() < 0.02 * post.mean.std()
    with pytest.raises(GuideGenError, match="multiples of 4"):
        tiled_decode(m, post.mode(), labels, tile=30, overlap=8)
    with pytest.raises(GuideGenError, match="smaller than tile"):
        tiled_decode(m, post.mode(), labels, tile=32, overlap=32)


# ------------------------------------------------------------------- training behaviour
def test_latent_scale_is_inverse_std():
    m = tiny_model().eval()
    batches = [rand_case(seed=s) for s in range(3)]
    scale = measure_latent_scale(m, batches)
    with torch.no_grad():
        z = torch.cat([m.encode(c, l).mode().flatten() for c, l in batches])
    assert scale == pytest.approx(1.0 / z.std().item(), rel=1e-4)
    m.latent_scale.fill_(scale)
    with torch.no_grad():
        zs = torch.cat([m.encode_latent(c, l).flatten() for c, l in batches])
        torch.testing.assert_close(m.decode_latent(m.encode_latent(*batches[0]), batches[0][1]),
                                   m.decode(m.encode(*batches[0]).mode(), batches[0][1]))
    assert zs.std().item() == pytest.approx(1.0, rel=1e-3)
    assert "latent_scale" in m.state_dict()


def test_tiny_training_loop_reduces_loss():
    torch.manual_seed(0)
    m = tiny_model()
    loss_fn = AutoencoderLoss(disc_start=10**9)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    hu, labels = phantom_like(grid=(16, 16, 16), seed=1)
    ct = hu_to_norm(hu)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        recon, post = m(ct, labels, generator=g)
        out = loss_fn.generator_loss(recon, ct, post, step, m.last_layer_weight, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["l1_full"].item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_autoencoder_task_trains_samples_and_exports(tmp_path, label_set):
    from torch.utils.data import Dataset

    from guidegen.training.autoencoder import AutoencoderTask
    from guidegen.training.trainer import Trainer, export_checkpoint, load_model_weights

    class Tiny(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            hu, lab = phantom_like(grid=(16, 16, 16), seed=i)
            return {"ct": hu[0], "labels": lab[0], "case": f"c{i}"}

    cfg = load_config("demo")
    cfg.data.grid = (16, 16, 16)
    cfg.autoencoder = AutoencoderConfig(channels=(4, 8, 8), label_embed_dim=4, disc_start=1,
                                        train=cfg.autoencoder.train.model_copy(update=dict(max_steps=3, sample_every=3, log_every=1, checkpoint_every=3)))
    task = AutoencoderTask(cfg, label_set)
    trainer = Trainer(tmp_path / "run", cfg.autoencoder.train, task, Tiny(), progress=False)
    trainer.fit()
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs and all(np.isfinite(r["loss"]) for r in logs)
    assert any(r.get("d_loss", 0) > 0 for r in logs if r["step"] >= 2)  # discriminators stepped after disc_start
    assert list((tmp_path / "run" / "samples").rglob("*.png"))
    meta = task.export_meta(trainer)
    out = export_checkpoint(trainer, tmp_path / "export", "autoencoder", cfg, meta)
    m = AnatomyAwareAutoencoder.from_config(cfg.autoencoder, label_set.num_classes)
    info = load_model_weights(m, out)
    assert info["latent_scale"] == pytest.approx(meta["latent_scale"]) and meta["latent_scale"] > 0
    assert float(m.latent_scale) == pytest.approx(meta["latent_scale"], rel=1e-3)  # stored as fp16


def test_autoencoder_task_builds_the_class_l1_weights(label_set):
    from guidegen.training.autoencoder import AutoencoderTask

    cfg = load_config("demo")
    cfg.autoencoder.class_l1_weights = {"tumor": 4.0, "rib": 2.0}
    loss = AutoencoderTask(cfg, label_set).modules()["disc"]
    w = loss.class_l1_class_weights
    assert w.shape == (label_set.num_classes,) and w[label_set.tumor_id] == 4.0 and w[label_set.id_of("rib")] == 2.0
    assert float(w.sum()) == label_set.num_classes - 2 + 6.0
    assert "class_l1_class_weights" not in loss.state_dict()  # config-derived, not a checkpoint tensor
    with pytest.raises(GuideGenError):
        cfg.autoencoder.class_l1_weights = {"tumour_typo": 2.0}
        AutoencoderTask(cfg, label_set).modules()
