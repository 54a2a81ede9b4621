"""TCSS denoiser (guidegen.models.tcss_unet) on tiny configs and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidegen.config import TCSSConfig, TrainConfig
from guidegen.diffusion import categorical as cat
from guidegen.errors import GuideGenError
from guidegen.models.tcss_unet import TCSSUNet

K, D, Q = 5, 16, 3
TINY = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8)


def tiny_model(**kw) -> TCSSUNet:
    torch.manual_seed(0)
    model = TCSSUNet(K, D, **{**TINY, **kw})
    # MONAI zero-initialises the output conv and the attention projections; give them small
    # random values so that the tests can see the input and the context reach the output.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    return model


def inputs(b: int, spatial: tuple[int, int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = cat.one_hot(torch.randint(0, K, (b, *spatial), generator=gen), K)
    t = torch.randint(1, 1000, (b,), generator=gen)
    ctx = torch.randn(b, Q, D, generator=gen)
    return x, t, ctx


@pytest.mark.parametrize("spatial", [(16, 16, 16), (16, 16, 24)])
def test_shapes_and_parameter_count(spatial):
    model = tiny_model()
    x, t, ctx = inputs(2, spatial)
    out = model(x, t, ctx)
    assert out.shape == (2, K, *spatial) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    n = model.num_parameters()
    print(f"tiny TCSSUNet parameters: {n}")
    assert 10_000 < n < 1_000_000


def test_fresh_model_predicts_uniform():
    model = TCSSUNet(K, D, **TINY)  # MONAI's zero-initialised output conv
    x, t, ctx = inputs(1, (16, 16, 16))
    assert torch.equal(model(x, t, ctx), torch.zeros(1, K, 16, 16, 16))


def test_voxel_evidence_hand_values():
    from guidegen.models.tcss_unet import voxel_evidence

    x = cat.one_hot(torch.tensor([[[[0, 2]]]]), 3)  # (1, 3, 1, 1, 2): voxels labelled 0 and 2
    ev = voxel_evidence(x, torch.tensor([0.7]))
    # matching class: log(0.7 + 0.3/3) = log 0.8; any other: log(0.1)
    want = torch.log(torch.tensor([[0.8, 0.1], [0.1, 0.1], [0.1, 0.8]])).view(1, 3, 1, 1, 2)
    torch.testing.assert_close(ev, want)
    assert torch.equal(voxel_evidence(x, torch.tensor([0.0])), torch.full_like(ev, float(torch.log(torch.tensor(1 / 3)))))


def test_input_evidence_copies_x_t_at_low_noise_and_fades_at_t_max():
    ab = cat.cosine_schedule(1000)
    model = TCSSUNet(K, D, **TINY, alphas_bar=ab)  # zero output conv: logits = evidence only
    assert "alphas_bar" not in model.state_dict()  # a schedule, not a weight: old checkpoints load
    x, _, ctx = inputs(2, (16, 16, 16))
    with torch.no_grad():
        low = model(x, torch.tensor([1, 1]), ctx)
        high = model(x, torch.tensor([1000, 1000]), ctx)
    assert torch.equal(low.argmax(1), x.argmax(1))
    probs = low.softmax(1).gather(1, x.argmax(1, keepdim=True))
    assert probs.min() > 0.99
    assert (high.max(1).values - high.min(1).values).max() < 0.05  # ~ uniform at ᾱ_T ≈ 0
    cfg = TCSSConfig(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, input_evidence=True)
    assert TCSSUNet.from_config(cfg, K, D).alphas_bar is not None
    assert TCSSUNet.from_config(cfg.model_copy(update={"input_evidence": False}), K, D).alphas_bar is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layerwise_context_equal_levels_match_plain_forward_and_levels_matter(checkpointing):
    model = tiny_model(gradient_checkpointing=checkpointing).train()
    x, t, ctx = inputs(2, (16, 16, 16))
    same = ctx[:, None].expand(-1, 2, -1, -1).contiguous().requires_grad_(True)
    plain_ctx = ctx.clone().requires_grad_(True)
    out = model(x, t, same)
    ref = model(x, t, plain_ctx)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(same.grad.sum(1), plain_ctx.grad, rtol=1e-4, atol=1e-6)
    # the deepest level (attention level 1) reads [:, 1]; changing [:, 0] (no attention) does nothing
    with torch.no_grad():
        other = same.detach().clone()
        other[:, 1] += 1.0
        assert (model(x, t, other) - out).abs().max() > 1e-4
        other = same.detach().clone()
        other[:, 0] += 1.0
        torch.testing.assert_close(model(x, t, other), out.detach())
    with pytest.raises(ValueError, match="layer-wise"):
        model(x, t, ctx[:, None].expand(-1, 3, -1, -1))


def test_output_depends_on_context_timestep_and_input():
    model = tiny_model().eval()
    x, t, ctx = inputs(2, (16, 16, 16))
    with torch.no_grad():
        base = model(x, t, ctx)
        assert (model(x, t, ctx + 1.0) - base).abs().max() > 1e-4
        assert (model(x, t + 100, ctx) - base).abs().max() > 1e-4
        x2, _, _ = inputs(2, (16, 16, 16), seed=1)
        assert (model(x2, t, ctx) - base).abs().max() > 1e-4
        # per-sample independence: changing sample 1's context leaves sample 0 unchanged
        ctx2 = ctx.clone()
        ctx2[1] += 1.0
        out2 = model(x, t, ctx2)
        torch.testing.assert_close(out2[0], base[0])
        assert (out2[1] - base[1]).abs().max() > 1e-4


def test_from_config_and_gradient_checkpointing_matches():
    cfg = TCSSConfig(channels=(8, 16, 16), attention_levels=(False, True, True), num_head_channels=8,
                     train=TrainConfig(gradient_checkpointing=True))
    model = TCSSUNet.from_config(cfg, K, D)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    assert model.gradient_checkpointing and model.downsample_factor == 4
    x, t, ctx = inputs(1, (16, 16, 24))
    x0 = torch.randint(0, K, (1, 16, 16, 24))
    grads = []
    for ckpt in (True, False):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        out = model(x, t, ctx)
        loss = cat.kl_loss(x0, x.argmax(1), out, t.clamp(max=1000), cat.cosine_schedule(1000))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if ckpt:
            ref = out.detach()
        else:
            torch.testing.assert_close(out.detach(), ref)
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_bad_configs_and_inputs():
    with pytest.raises(GuideGenError, match="attention_levels"):
        TCSSUNet(K, D, channels=(8, 16), attention_levels=(True,))
    with pytest.raises(GuideGenError, match="num_head_channels"):
        TCSSUNet(K, D, channels=(8, 12), attention_levels=(False, True), num_head_channels=8)
    model = tiny_model()
    x, t, ctx = inputs(1, (16, 16, 16))
    with pytest.raises(GuideGenError, match="data.grid"):
        model(cat.one_hot(torch.zeros(1, 16, 16, 15, dtype=torch.long), K), t, ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, ctx[..., :4])


def test_patch_size_folds_blocks_into_channels():
    from guidegen.models.tcss_unet import depth_to_space, space_to_depth

    x = torch.randn(2, 3, 8, 4, 6)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 24, 4, 2, 3)
    torch.testing.assert_close(y[1, 8:16, 1, 0, 2], x[1, 1, 2:4, 0:2, 4:6].reshape(-1))
    assert torch.equal(depth_to_space(y, 2), x)

    cfg = TCSSConfig(channels=(16, 16), attention_levels=(False, True), num_head_channels=8, patch_size=2)
    model = TCSSUNet.from_config(cfg, K, D)
    assert model.patch_size == 2 and model.downsample_factor == 4
    assert model.unet.conv_in.conv.in_channels == K * 8
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    x, t, ctx = inputs(1, (16, 16, 24))
    out = model(x, t, ctx)
    assert out.shape == (1, K, 16, 16, 24)
    # one voxel's input change reaches its own logits (the un/fold keeps positions aligned)
    x2 = x.clone()
    x2[0, :, 5, 9, 13] = torch.roll(x2[0, :, 5, 9, 13], 1)
    with torch.no_grad():
        diff = (model(x2, t, ctx) - out).abs().sum(1)[0]
    assert diff[5, 9, 13] > 0
    with pytest.raises(GuideGenError, match="data.grid"):
        model(cat.one_hot(torch.zeros(1, 16, 16, 18, dtype=torch.long), K), t, ctx)


def test_tumor_site_classes_from_findings_vector(label_set):
    from guidegen.text.findings import parse_findings
    from guidegen.text.prompts import findings_vector
    from guidegen.training.tcss import TumorRequests, tumor_guidance_fn, tumor_site_classes

    texts = ["4 cm mass in the left kidney and a 2 cm lesion in the liver.", "No focal lesion.", "Liver mass."]
    vec = torch.from_numpy(np.stack([findings_vector(parse_findings(t)) for t in texts]))
    sites = tumor_site_classes(vec, label_set)
    assert sites.shape == (3, label_set.num_classes)
    assert {label_set.name_of(int(i)) for i in sites[0].nonzero()} == {"kidney", "liver"}
    assert not sites[1].any() and {label_set.name_of(int(i)) for i in sites[2].nonzero()} == {"liver"}
    assert not tumor_site_classes(torch.zeros_like(vec), label_set).any()  # the no-knowledge ablation
    requests = TumorRequests.from_vector(vec, label_set)
    assert requests.sites.shape == (3, label_set.num_classes, 2) and torch.equal(requests.sites[..., 0], sites)
    assert torch.equal(requests.sites[..., 1], sites) and not requests.volume_voxels.any()  # no sides, no volume
    logits = torch.randn(3, label_set.num_classes, 2, 2, 2)
    gated = tumor_guidance_fn(requests, label_set, 1.0, drop=torch.tensor([False, False, True]))(logits)
    assert not torch.equal(gated[0], logits[0]) and torch.equal(gated[1:], logits[1:])  # row 2 dropped
    assert tumor_guidance_fn(requests, label_set, 0.0) is None


def test_tumor_requests_from_findings(label_set):
    import math

    from guidegen.text.findings import parse_findings
    from guidegen.training.tcss import TumorRequests, tumor_guidance_fn

    texts = ["4 cm mass in the left kidney and a 2 cm lesion in the liver.", "No focal lesion.",
             "Liver mass of unknown size and a 3 cm right lung nodule."]
    req = TumorRequests.from_findings([parse_findings(t) for t in texts], label_set, spacing_mm=(2.0, 2.0, 2.0))
    kidney, liver, lung = (label_set.id_of(n) for n in ("kidney", "liver", "lung"))
    assert req.sites[0, kidney].tolist() == [True, False] and req.sites[0, liver].tolist() == [True, True]
    assert not req.sites[1].any() and req.sites[2, lung].tolist() == [False, True]
    # lesion boxes: 40 mm on 2 mm voxels is 20 voxels, the odd width 21; 20 mm 11; unknown size 1;
    # the body envelope is bulge tissue unless every site is confined (the lung)
    assert req.lesion_boxes[0, kidney].tolist() == [21, 21, 21] and req.lesion_boxes[0, liver].tolist() == [11, 11, 11]
    assert req.lesion_boxes[2, liver].tolist() == [1, 1, 1] and req.lesion_boxes[2, lung].tolist() == [15, 15, 15]
    assert int(req.lesion_boxes[1].sum()) == 0 and int(req.lesion_boxes[0].count_nonzero()) == 6
    body = label_set.body_id
    assert req.bulge_classes[0, body] and req.bulge_classes[2, body] and not req.bulge_classes[1].any()
    only_lung = TumorRequests.from_findings([parse_findings("A 3 cm mass in the right lung.")], label_set, (2.0, 2.0, 2.0))
    assert not only_lung.bulge_classes.any()
    # equivalent spheres of 40 and 20 mm in 2 mm voxels; no volume when one size is unknown or no tumour
    torch.testing.assert_close(req.volume_voxels, torch.tensor([math.pi / 6 * (40**3 + 20**3) / 8.0, 0.0, 0.0]))
    # with volume matching on, row 0's expected tumour volume becomes the request; row 1 is untouched
    logits = torch.randn(3, label_set.num_classes, 30, 30, 30, generator=torch.Generator().manual_seed(0))
    out = tumor_guidance_fn(req, label_set, 1.0, size_guidance=1.0)(logits)
    expected = out.softmax(1)[:, label_set.tumor_id].flatten(1).sum(1)
    torch.testing.assert_close(expected[0], req.volume_voxels[0], rtol=1e-3, atol=1e-2)
    assert torch.equal(out[1], logits[1])


def test_lesion_scale_centres_the_matched_lesion(label_set):
    """A 3 x 3 x 15 organ bar in fat, the network's tumour evidence the same against every voxel's
    own class, 45 voxels asked: the voxel-scale gate spreads them evenly over the bar (a lesion
    anywhere along it, up to eating it whole); at lesion scale they gather at the bar's middle,
    spill into the fat beside it, and never reach fat away from the organ."""
    from guidegen.training.tcss import TumorRequests, tumor_guidance_fn

    K, grid = label_set.num_classes, (9, 9, 21)
    body, organ_id, tid = label_set.body_id, label_set.id_of("pancreas"), label_set.tumor_id
    organ = torch.zeros(grid, dtype=torch.bool)
    organ[3:6, 3:6, 3:18] = True
    logits = torch.full((1, K, *grid), -8.0)
    logits[0, body] = 0.0
    logits[0, organ_id][organ] = 8.0
    logits[0, tid] = torch.where(organ, 6.0, -2.0)
    sites = torch.zeros(1, K, 2, dtype=torch.bool)
    sites[0, organ_id] = True
    boxes = torch.zeros(1, K, 3, dtype=torch.long)
    boxes[0, organ_id] = 5
    bulge = torch.zeros(1, K, dtype=torch.bool)
    bulge[0, body] = True
    req = TumorRequests(sites, torch.tensor([45.0]), boxes, bulge)
    flat = tumor_guidance_fn(req, label_set, 1.0, 1.0)(logits).softmax(1)[0, tid]
    deep = tumor_guidance_fn(req, label_set, 1.0, 1.0, lesion_scale=True)(logits).softmax(1)[0, tid]
    for p in (flat, deep):
        torch.testing.assert_close(p.sum(), torch.tensor(45.0), rtol=1e-3, atol=0)  # the volume asked
    torch.testing.assert_close(flat[4, 4, 10], flat[4, 4, 3])  # middle and end alike
    assert float(flat[~organ].sum()) < 0.5  # the voxel-scale gate keeps it inside the bar
    assert float(deep[4, 4, 10]) > 1.5 * float(deep[4, 4, 3])  # the middle before the ends
    assert float(deep[2, 4, 10]) > float(deep[4, 4, 3])  # the fat beside the middle before the ends
    near = torch.zeros(grid, dtype=torch.bool)  # within half a box (2 voxels) of the organ
    near[1:8, 1:8, 1:20] = True
    assert float(deep[~near].max()) < 1e-4  # fat beyond the lesion's reach: next to nothing (a soft gate)


class _FixedLogitsModel:
    """Stands in for a ConditionedDenoiser: the x_0 logits are a fixed field times ``scale``."""

    def __init__(self, logits: torch.Tensor, scale: float = 1.0):
        self.logits, self.scale = logits, scale

    def context(self, tokens, mask, findings_vec):
        return torch.zeros(tokens.shape[0], 1, 4)

    def null_context(self, batch: int):
        return torch.zeros(batch, 1, 4)

    def net(self, x, t, context):
        return (self.logits * self.scale).expand(x.shape[0], *self.logits.shape[1:])


def test_sampling_temperature_divides_the_logits_before_the_constraints(label_set):
    from guidegen.training.tcss import TumorRequests, sample_label_maps

    K, grid = label_set.num_classes, (6, 6, 6)
    logits = torch.randn(1, K, *grid, generator=torch.Generator().manual_seed(3)) * 3
    cond = {"tokens": torch.zeros(1, 2, 4), "mask": torch.ones(1, 2, dtype=torch.bool), "findings_vec": torch.zeros(1, 8)}
    sites = torch.zeros(1, K, 2, dtype=torch.bool)
    sites[0, label_set.id_of("liver")] = True
    requests = TumorRequests(sites, torch.tensor([20.0]))
    alphas_bar = cat.cosine_schedule(50)

    def run(model, temperature):
        return sample_label_maps(model, cond, grid, alphas_bar, label_set, steps=5, guidance=1.0,
                                 generator=torch.Generator().manual_seed(0), site_gate=1.0, size_guidance=1.0,
                                 requests=requests, temperature=temperature)

    # temperature T on logits L is the model L / T at temperature 1, constraints included: the
    # volume matching sees the sharpened distribution, so the tumour volume asked is the one sampled
    assert torch.equal(run(_FixedLogitsModel(logits), 0.5), run(_FixedLogitsModel(logits, 2.0), 1.0))
    assert not torch.equal(run(_FixedLogitsModel(logits), 0.5), run(_FixedLogitsModel(logits), 1.0))
    with pytest.raises(GuideGenError, match="temperature must be > 0"):
        run(_FixedLogitsModel(logits), 0.0)


def test_prior_tempering_sharpens_the_prior_and_keeps_the_evidence_exact():
    """softmax(prior_tempered) = p_prior^(1/T) · q(x_t | x_0) normalised, by hand on a tiny UNet."""
    from guidegen.training.tcss import prior_tempered

    ab = cat.cosine_schedule(100)
    with_evidence = tiny_model(alphas_bar=ab)
    plain = tiny_model()  # same seed, same weights: the logits without the evidence = the prior
    x, _, ctx = inputs(2, (16, 16, 16))
    t = torch.tensor([5, 60])
    with torch.no_grad():
        prior = plain(x, t, ctx)
        got = torch.softmax(prior_tempered(with_evidence, 0.4)(x, t, ctx), dim=1)
        a = ab[t].float().view(-1, 1, 1, 1, 1)
        want = torch.softmax(prior / 0.4, dim=1) * (a * x + (1 - a) / K)
        torch.testing.assert_close(got, want / want.sum(1, keepdim=True), rtol=1e-4, atol=1e-6)
        # temperature 1 is the network itself; without the evidence skip, the plain division
        torch.testing.assert_close(prior_tempered(with_evidence, 1.0)(x, t, ctx), with_evidence(x, t, ctx))
        torch.testing.assert_close(prior_tempered(plain, 0.4)(x, t, ctx), prior / 0.4)
        # dividing everything instead sharpens the noisy observation's likelihood as well
        all_tempered = torch.softmax(with_evidence(x, t, ctx) / 0.4, dim=1)
        assert (all_tempered - got).abs().max() > 1e-2
    with pytest.raises(GuideGenError, match="temperature must be > 0"):
        prior_tempered(plain, 0.0)


def test_temperature_config_must_be_positive():
    from guidegen.config import config_from_dict

    with pytest.raises(GuideGenError, match=r"x\.yaml: tcss\.temperature"):
        config_from_dict({"tcss": {"temperature": 0}}, "x.yaml")
    assert config_from_dict({"tcss": {"temperature": 0.5}}, "x.yaml").tcss.temperature == 0.5
