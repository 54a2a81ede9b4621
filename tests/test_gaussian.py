"""Latent Gaussian diffusion math (guidegen.diffusion.gaussian) against hand-computed cases."""

import numpy as np
import pytest
import torch

from guidegen.diffusion import gaussian as g

T = 1000


def hand_alphas_bar(timesteps=T):
    """The LDM schedule written out: beta linear in sqrt(beta) from 0.0015 to 0.0195."""
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def oracle(x0, prediction, ab):
    """A perfect denoiser for the single data point x0: returns the exact ε (or v) of z_t."""
    def denoise(z, t):
        a = ab[t].view(-1, *[1] * (z.ndim - 1)).to(z.dtype)
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return denoise


def test_schedule_is_the_ldm_scaled_linear_one():
    sched = g.make_scheduler("ddpm", T, "epsilon")
    ab = g.alphas_cumprod(sched).double().numpy()
    np.testing.assert_allclose(ab, hand_alphas_bar(), rtol=1e-4)
    assert 1.3e-4 < ab[-1] < 1.5e-4  # terminal ab ≈ 1.4e-4: almost, not exactly, pure noise
    assert sched.clip_sample is False  # latents are not in [-1, 1]


def test_add_noise_matches_formula():
    sched = g.make_train_scheduler(type("C", (), {"timesteps": T, "prediction": "epsilon"})())
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, 2, generator=gen)
    t = torch.tensor([0, 417, 999])
    ab = torch.from_numpy(hand_alphas_bar()).float()[t].view(3, 1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(g.add_noise(sched, x0, eps, t), expected, rtol=1e-4, atol=1e-5)


def test_targets_and_x0_inversion():
    sched = g.make_scheduler("ddpm", T, "v_prediction")
    x0, eps = torch.randn(2, 4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    t = torch.tensor([5, 700])
    a = torch.from_numpy(hand_alphas_bar()).float()[t].view(2, 1, 1, 1, 1)
    v = g.training_target(sched, x0, eps, t, "v_prediction")
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-4, atol=1e-5)
    assert g.training_target(sched, x0, eps, t, "epsilon") is eps
    zt = g.add_noise(sched, x0, eps, t)
    ab = g.alphas_cumprod(sched)
    torch.testing.assert_close(g.predict_x0(v, zt, t, ab, "v_prediction"), x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g.predict_x0(eps, zt, t, ab, "epsilon"), x0, rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="prediction"):
        g.training_target(sched, x0, eps, t, "x0")


def test_ddim_timesteps_chain_with_monai_previous_step_rule():
    ts = g.ddim_timesteps(T, 50)
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50 and set((ts[:-1] - ts[1:]).tolist()) == {20}
    ts = g.ddim_timesteps(T, 30)  # 1000 % 30 != 0: still consecutive under prev = t - T // steps
    assert len(ts) == 30 and ts[0] == 999 and set((ts[:-1] - ts[1:]).tolist()) == {T // 30}
    assert g.ddim_timesteps(T, T).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        g.ddim_timesteps(T, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 30, 1])
def test_ddim_with_oracle_recovers_x0(prediction, steps):
    x0 = torch.randn(2, 4, 3, 3, 4, generator=torch.Generator().manual_seed(1)) * 2.0  # unclipped range
    ab = g.alphas_cumprod(g.make_scheduler("ddim", T, prediction))
    out = g.sample_latent(oracle(x0, prediction, ab), x0.shape, sampler="ddim", steps=steps, timesteps=T,
                          prediction=prediction, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)


def test_ddpm_with_oracle_recovers_x0_over_all_steps():
    x0 = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    ab = g.alphas_cumprod(g.make_scheduler("ddpm", T, "epsilon"))
    calls = []
    fn = oracle(x0, "epsilon", ab)
    out = g.sample_latent(lambda z, t: (calls.append(int(t[0])), fn(z, t))[1], x0.shape, sampler="ddpm", steps=10,
                          timesteps=T, prediction="epsilon", generator=torch.Generator().manual_seed(3))
    assert calls == list(range(999, -1, -1))  # full ancestral chain whatever `steps` says
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)


def test_guidance_formula_and_wrapper():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(g.classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(g.classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(g.classifier_free_guidance(cond, uncond, 2.5), torch.tensor([1.75, 9.0]))

    w = torch.tensor(0.7)

    def net(z, t, c):  # output depends on the context's mean and on t
        return z * w + c.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) * 1e-3

    z, t = torch.randn(2, 4, 2, 2, 2), torch.tensor([10, 10])
    ctx, null = torch.randn(2, 3, 8), torch.randn(1, 3, 8)
    torch.testing.assert_close(g.guided(net, ctx, null, 1.0)(z, t), net(z, t, ctx))
    c_out, u_out = net(z, t, ctx), net(z, t, null.expand(2, -1, -1))
    torch.testing.assert_close(g.guided(net, ctx, null, 3.0)(z, t), u_out + 3.0 * (c_out - u_out))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_is_deterministic_for_a_seed(sampler, eta):
    def fn(z, t):
        return 0.3 * z + 0.01 * t.view(-1, 1, 1, 1, 1)

    def run(seed):
        return g.sample_latent(fn, (1, 4, 2, 2, 2), sampler=sampler, steps=10, timesteps=100, prediction="epsilon",
                               generator=torch.Generator().manual_seed(seed), eta=eta)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_ddim_eta0_depends_only_on_initial_noise():
    noise = torch.randn(1, 4, 2, 2, 2)
    fn = lambda z, t: 0.2 * z  # noqa: E731
    a = g.sample_latent(fn, noise.shape, steps=8, timesteps=100, noise=noise, generator=torch.Generator().manual_seed(0))
    b = g.sample_latent(fn, noise.shape, steps=8, timesteps=100, noise=noise, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
