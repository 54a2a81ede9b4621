"""Uniform categorical diffusion math (guidegen.diffusion.categorical) against brute force.

Brute force = explicit K×K transition matrices Q_t = alpha_t·I + (1 - alpha_t)/K·11ᵀ (row i is
q(x_t | x_{t-1} = i)), their products for multi-step transitions, and Bayes by enumeration.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guidegen.diffusion import categorical as cat
from guidegen.errors import GuideGenError

K, T = 4, 8
ABAR = cat.cosine_schedule(T)


def q_matrix(t: int, abar: torch.Tensor = ABAR, k: int = K) -> torch.Tensor:
    alpha = float(abar[t] / abar[t - 1])
    return alpha * torch.eye(k, dtype=torch.float64) + (1 - alpha) / k * torch.ones(k, k, dtype=torch.float64)


def q_product(s: int, t: int) -> torch.Tensor:
    """Transition matrix from step s to step t (product Q_{s+1} ⋯ Q_t); identity if s == t."""
    m = torch.eye(K, dtype=torch.float64)
    for u in range(s + 1, t + 1):
        m = m @ q_matrix(u)
    return m


def brute_posterior(xt: int, x0_probs: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """q(x_s = · | x_t = xt, x_0 ~ x0_probs) by enumerating x_s; (K,)."""
    like = q_product(s, t)[:, xt]                 # q(x_t = xt | x_s = j) for every j
    prior = x0_probs @ q_product(0, s)            # q(x_s = j | x_0)
    post = like * prior
    return post / post.sum()


def brute_model_posterior(xt: int, pi: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Σ_k q(x_s | x_t, x_0 = k) · pi_k; (K,)."""
    return sum(pi[k] * brute_posterior(xt, F.one_hot(torch.tensor(k), K).double(), t, s) for k in range(K))


def random_case(gen: torch.Generator, b: int = 2, spatial=(3, 2, 2)):
    x0 = torch.randint(0, K, (b, *spatial), generator=gen)
    xt = torch.randint(0, K, (b, *spatial), generator=gen)
    logits = 3 * torch.randn((b, K, *spatial), generator=gen, dtype=torch.float64)
    return x0, xt, logits


def test_cosine_schedule_properties():
    abar = cat.cosine_schedule(1000)
    assert abar.shape == (1001,) and abar.dtype == torch.float64
    assert abar[0] == 1.0
    assert bool((abar[1:] < abar[:-1]).all()), "abar must strictly decrease"
    assert bool((abar > 0).all()) and bool((abar <= 1).all())
    alphas = cat.step_alphas(abar)
    assert float((1 - alphas[1:]).max()) <= 0.999 + 1e-12  # betas clipped
    assert abar[500] == pytest.approx(0.5, abs=0.05)          # cosine: about half kept mid-way
    assert float(abar[-1]) < 1e-3


def test_q_xt_given_x0_equals_matrix_products():
    gen = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(2, K, 3, generator=gen, dtype=torch.float64), dim=1)
    for t in range(1, T + 1):
        got = cat.q_xt_given_x0(soft, t, ABAR)
        want = torch.einsum("bkn,kj->bjn", soft, q_product(0, t))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.sum(1), torch.ones(2, 3, dtype=torch.float64))


def test_q_sample_marginals():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.zeros(1, 40_000, dtype=torch.long)
    t = 4
    xt = cat.q_sample(x0, t, ABAR, K, generator=gen)
    freq = torch.bincount(xt.flatten(), minlength=K).double() / xt.numel()
    want = cat.q_xt_given_x0(cat.one_hot(x0, K, torch.float64), t, ABAR)[0, :, 0]
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)


def test_q_skip_sample_composes_with_q_sample():
    """x_s ~ q(x_s | x_0), then x_t ~ q(x_t | x_s): the frequencies of q(x_t | x_0), which for
    x_0 = 0 is abar_t + (1 - abar_t)/K for class 0 and (1 - abar_t)/K for each other class."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.zeros(1, 40_000, dtype=torch.long)
    s, t = 2, 6
    xs = cat.q_sample(x0, s, ABAR, K, generator=gen)
    xt = cat.q_skip_sample(xs, s, t, ABAR, K, generator=gen)
    freq = torch.bincount(xt.flatten(), minlength=K).double() / xt.numel()
    a = float(ABAR[t])
    torch.testing.assert_close(freq, torch.tensor([a + (1 - a) / K] + [(1 - a) / K] * (K - 1), dtype=torch.float64),
                               atol=0.01, rtol=0)
    # and it keeps x_s at the rate abar_t / abar_s (a voxel kept or redrawn onto itself)
    same = float((xt == xs).double().mean())
    keep = float(ABAR[t] / ABAR[s])
    assert same == pytest.approx(keep + (1 - keep) / K, abs=0.01)


@pytest.mark.parametrize("t", [1, 2, 5, T])
def test_q_posterior_matches_bayes(t):
    gen = torch.Generator().manual_seed(t)
    x0, xt, logits = random_case(gen)
    soft = torch.softmax(logits, 1)
    for x0_probs in (cat.one_hot(x0, K, torch.float64), soft):
        got = cat.q_posterior(cat.one_hot(xt, K, torch.float64), x0_probs, t, ABAR)
        torch.testing.assert_close(got.sum(1), torch.ones_like(got[:, 0]))
        for b, x, y, z in [(0, 0, 0, 0), (1, 2, 1, 1), (0, 1, 1, 0)]:
            want = brute_posterior(int(xt[b, x, y, z]), x0_probs[b, :, x, y, z], t, t - 1)
            torch.testing.assert_close(got[b, :, x, y, z], want, rtol=1e-9, atol=1e-12)


def test_skip_posterior_matches_bayes_and_one_step():
    gen = torch.Generator().manual_seed(3)
    x0, xt, _ = random_case(gen)
    x0_oh, xt_oh = cat.one_hot(x0, K, torch.float64), cat.one_hot(xt, K, torch.float64)
    for t, s in [(8, 3), (5, 0), (2, 1), (7, 6)]:
        got = cat.q_skip_posterior(xt_oh, x0_oh, t, s, ABAR)
        want = brute_posterior(int(xt[1, 2, 0, 1]), x0_oh[1, :, 2, 0, 1], t, s)
        torch.testing.assert_close(got[1, :, 2, 0, 1], want, rtol=1e-9, atol=1e-12)
    t = torch.tensor([6, 3])
    torch.testing.assert_close(cat.q_skip_posterior(xt_oh, x0_oh, t, t - 1, ABAR),
                               cat.q_posterior(xt_oh, x0_oh, t, ABAR))
    with pytest.raises(ValueError):
        cat.q_skip_posterior(xt_oh, x0_oh, 3, 3, ABAR)


@pytest.mark.parametrize("t,s", [(1, 0), (2, 1), (6, 5), (T, 2), (5, 0)])
def test_model_posterior_equals_explicit_sum_over_x0(t, s):
    gen = torch.Generator().manual_seed(10 * t + s)
    _, xt, logits = random_case(gen)
    xt_oh = cat.one_hot(xt, K, torch.float64)
    log_p = cat.model_log_skip_posterior(xt_oh, logits, t, s, ABAR)
    pi = torch.softmax(logits, 1)
    torch.testing.assert_close(torch.logsumexp(log_p, 1), torch.zeros_like(log_p[:, 0]), atol=1e-12, rtol=0)
    for b, x, y, z in [(0, 0, 0, 0), (1, 2, 1, 1), (1, 0, 1, 0)]:
        want = brute_model_posterior(int(xt[b, x, y, z]), pi[b, :, x, y, z], t, s)
        torch.testing.assert_close(log_p[b, :, x, y, z].exp(), want, rtol=1e-9, atol=1e-12)
    # the honest marginal differs from naively plugging pi into the posterior formula (visibly so
    # while x_t still carries signal; near t = T the weights 1/Z_k are almost uniform)
    naive = cat.q_skip_posterior(xt_oh, pi, t, s, ABAR)
    if t > 1 and float(ABAR[t]) > 0.1:
        assert not torch.allclose(naive, log_p.exp(), atol=1e-4)
    # probability-space wrapper agrees
    torch.testing.assert_close(cat.model_skip_posterior(xt_oh, pi, t, s, ABAR), log_p.exp(), rtol=1e-9, atol=1e-12)
    if s == t - 1:
        torch.testing.assert_close(cat.model_posterior(xt_oh, pi, t, ABAR), log_p.exp(), rtol=1e-9, atol=1e-12)


def test_model_posterior_at_t1_is_prediction():
    gen = torch.Generator().manual_seed(5)
    _, xt, logits = random_case(gen)
    log_p = cat.model_log_posterior(cat.one_hot(xt, K, torch.float64), logits, 1, ABAR)
    torch.testing.assert_close(log_p, torch.log_softmax(logits, 1), rtol=1e-9, atol=1e-9)


def test_kl_loss_zero_for_perfect_prediction_positive_otherwise():
    gen = torch.Generator().manual_seed(7)
    x0, xt, logits = random_case(gen, b=3)
    t = torch.tensor([1, 4, T])
    perfect = 40.0 * cat.one_hot(x0, K, torch.float64)  # softmax ≈ one-hot, p(wrong) ~ e^-40
    assert float(cat.kl_loss(x0, xt, perfect, t, ABAR)) < 1e-12
    bad = cat.kl_loss(x0, xt, logits, t, ABAR, reduction="none")
    assert bad.shape == x0.shape and bool((bad >= -1e-12).all())
    assert float(bad.mean()) > 1e-3


def test_kl_loss_matches_brute_force_and_decoder_term():
    gen = torch.Generator().manual_seed(8)
    x0, xt, logits = random_case(gen)
    t = torch.tensor([5, 1])
    per_voxel = cat.kl_loss(x0, xt, logits, t, ABAR, reduction="none")
    pi = torch.softmax(logits, 1)
    for b in range(2):
        tb = int(t[b])
        for x, y, z in [(0, 0, 0), (2, 1, 1)]:
            q = brute_posterior(int(xt[b, x, y, z]), F.one_hot(x0[b, x, y, z], K).double(), tb, tb - 1)
            p = brute_model_posterior(int(xt[b, x, y, z]), pi[b, :, x, y, z], tb, tb - 1)
            mask = q > 0
            want = (q[mask] * (q[mask].log() - p[mask].log())).sum()
            torch.testing.assert_close(per_voxel[b, x, y, z], want, rtol=1e-8, atol=1e-10)
    # t = 1: decoder NLL = cross-entropy of the prediction
    nll = F.cross_entropy(logits[1:], x0[1:], reduction="none")
    torch.testing.assert_close(per_voxel[1:], nll, rtol=1e-9, atol=1e-9)


def test_kl_loss_aux_ce_class_weights_and_gradients():
    gen = torch.Generator().manual_seed(9)
    x0, xt, logits = random_case(gen)
    logits = logits.float().requires_grad_(True)
    t = torch.tensor([1, 3])
    base = cat.kl_loss(x0, xt, logits, t, ABAR)
    with_ce = cat.kl_loss(x0, xt, logits, t, ABAR, aux_ce_weight=0.5)
    ce = F.cross_entropy(logits, x0)
    torch.testing.assert_close(with_ce, base + 0.5 * ce, rtol=1e-5, atol=1e-6)
    # class weights: weighted mean over voxels by the weight of the true class
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])
    per = cat.kl_loss(x0, xt, logits, t, ABAR, reduction="none")
    want = (w[x0] * per).sum() / w[x0].sum()
    torch.testing.assert_close(cat.kl_loss(x0, xt, logits, t, ABAR, class_weights=w), want)
    # finite gradients even for extreme logits in float32
    extreme = (torch.randn(logits.shape, generator=gen) * 80).requires_grad_(True)
    loss = cat.kl_loss(x0, xt, extreme, torch.tensor([1, T]), ABAR, aux_ce_weight=0.1)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(extreme.grad).all())


def test_sample_timesteps_follows_power_law():
    gen = torch.Generator().manual_seed(11)
    n, steps = 60_000, 10
    t = cat.sample_timesteps(n, steps, power=1.5, generator=gen)
    assert t.dtype == torch.long and int(t.min()) >= 1 and int(t.max()) <= steps
    counts = torch.bincount(t, minlength=steps + 1)[1:].double()
    p = torch.arange(1, steps + 1, dtype=torch.float64) ** 1.5
    expected = n * p / p.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # 99.9% quantile of chi-square with 9 degrees of freedom
    # a wrong law (uniform) is rejected by the same statistic
    uniform = torch.full_like(expected, n / steps)
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 1000


def test_strided_timesteps():
    assert cat.strided_timesteps(10, 10) == list(range(10, 0, -1))
    ts = cat.strided_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 1000 and ts[-1] == 1 and all(a > b for a, b in zip(ts, ts[1:]))
    assert cat.strided_timesteps(1000, 1) == [1000]
    with pytest.raises(GuideGenError, match="sample steps"):
        cat.strided_timesteps(10, 11)


def test_windowed_timesteps_put_the_share_above_the_window_by_hand():
    # round(3/7 * 7) = 3 visits evenly in (10, 19]: 19, 15, 11; the other 4 evenly in [1, 10]: 10, 7, 4, 1
    assert cat.strided_timesteps(19, 7, window_t=10, window_share=3 / 7) == [19, 15, 11, 10, 7, 4, 1]
    ts = cat.strided_timesteps(1000, 50, window_t=850, window_share=0.6)
    assert len(ts) == 50 and ts[0] == 1000 and ts[-1] == 1 and all(a > b for a, b in zip(ts, ts[1:]))
    assert sum(t > 850 for t in ts) == 30 and ts[30] == 850
    # off (either knob 0) is the even grid; the window never takes the last two visits below it
    assert cat.strided_timesteps(1000, 25, 850, 0.0) == cat.strided_timesteps(1000, 25, 0, 0.6) == cat.strided_timesteps(1000, 25)
    assert cat.strided_timesteps(1000, 5, 799, 0.99) == [1000, 900, 800, 799, 1]  # 3 above, 2 below
    # the window cannot hold more visits than it has timesteps: both of (17, 19], the other 4 below
    assert cat.strided_timesteps(19, 6, window_t=17, window_share=0.9) == [19, 18, 17, 12, 6, 1]
    with pytest.raises(GuideGenError, match="window must start"):
        cat.strided_timesteps(10, 5, window_t=10, window_share=0.5)
    with pytest.raises(GuideGenError, match="share"):
        cat.strided_timesteps(10, 5, window_t=5, window_share=1.0)


def _fixed_denoiser(x0: torch.Tensor, calls: list | None = None):
    """A 'perfect' denoiser that always predicts x0 with near-certainty."""
    def fn(xt_oh, t):
        assert xt_oh.shape[1] == K and xt_oh.dtype == torch.float32 and t.shape == (xt_oh.shape[0],)
        if calls is not None:
            calls.append(int(t[0]))
        return 30.0 * cat.one_hot(x0, K)
    return fn


def _learned_like_denoiser():
    """A deterministic denoiser whose output depends on x_t and t (stands in for a network)."""
    w = torch.randn(K, K, generator=torch.Generator().manual_seed(2))

    def fn(xt_oh, t):
        mixed = torch.einsum("kj,bj...->bk...", w, xt_oh)
        return mixed * (1 + t.view(-1, 1, 1, 1, 1).float() / T) + mixed.roll(1, dims=2)
    return fn


def test_strided_with_all_steps_equals_ancestral():
    shape = (2, 6, 5, 4)
    den = _learned_like_denoiser()
    a = cat.sample_ancestral(den, shape, K, ABAR, torch.Generator().manual_seed(123))
    b = cat.sample_strided(den, shape, K, ABAR, T, torch.Generator().manual_seed(123))
    c = cat.sample_ancestral(den, shape, K, ABAR, torch.Generator().manual_seed(124))
    assert a.shape == shape and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the result does depend on the random stream


def test_perfect_denoiser_reproduces_forward_marginals():
    """With the true x0 the reverse chain's x_s has the forward marginal q(x_s | x0)."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, K, (2, 16, 16, 16), generator=gen)
    for sampler, kw in ((cat.sample_ancestral, {}), (cat.sample_strided, {"steps": 4}),
                        (cat.sample_strided, {"steps": 4, "churn": 0.5}),
                        (cat.sample_strided, {"steps": 4, "window_t": T // 2, "window_share": 0.5})):
        seen: dict[int, float] = {}
        calls: list[int] = []
        out = sampler(_fixed_denoiser(x0, calls), tuple(x0.shape), K, ABAR, generator=gen,
                      callback=lambda i, s, x: seen.__setitem__(s, float((x == x0).double().mean())), **kw)
        assert torch.equal(out, x0)
        # churn overshoots and re-noises between the visits: the same calls, the same marginals
        assert calls == (list(range(T, 0, -1)) if not kw else
                         cat.strided_timesteps(T, 4, kw.get("window_t", 0), kw.get("window_share", 0.0)))
        for s, frac in seen.items():
            if s > 0:
                want = float(ABAR[s] + (1 - ABAR[s]) / K)
                assert frac == pytest.approx(want, abs=0.02), (sampler.__name__, s)


def test_guidance():
    gen = torch.Generator().manual_seed(6)
    c, u = torch.randn(2, K, 3, generator=gen), torch.randn(2, K, 3, generator=gen)
    torch.testing.assert_close(cat.guided_logits(c, u, 1.0), c)
    torch.testing.assert_close(cat.guided_logits(c, u, 0.0), u)
    torch.testing.assert_close(cat.guided_logits(c, u, 3.0), u + 3 * (c - u))

    calls = []

    def model_fn(x, t, ctx):
        calls.append(x.shape[0])
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    x = cat.one_hot(torch.randint(0, K, (2, 2, 2, 2), generator=gen), K)
    t = torch.tensor([3, 3])
    ctx, null = torch.full((2, 5, 8), 2.0), torch.zeros(1, 5, 8)
    guided = cat.classifier_free_guidance(model_fn, ctx, null, 1.5)(x, t)
    assert calls == [4]  # one doubled batch
    torch.testing.assert_close(guided, cat.guided_logits(2 * x, 0 * x, 1.5))
    calls.clear()
    plain = cat.classifier_free_guidance(model_fn, ctx, null, 1.0)(x, t)
    assert calls == [2] and torch.equal(plain, 2 * x)


def test_guided_transform_applies_after_guidance():
    x = cat.one_hot(torch.randint(0, K, (2, 2, 2, 2), generator=torch.Generator().manual_seed(1)), K)
    ctx, null = torch.full((2, 5, 8), 2.0), torch.zeros(1, 5, 8)
    model_fn = lambda x, t, c: x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + 1.0  # noqa: E731
    square = lambda logits: logits**2  # noqa: E731  (not shift-invariant: shows where it is applied)
    guided = cat.classifier_free_guidance(model_fn, ctx, null, 3.0, square)(x, torch.tensor([2, 2]))
    torch.testing.assert_close(guided, cat.guided_logits(2 * x + 1.0, 0 * x + 1.0, 3.0) ** 2)
    plain = cat.classifier_free_guidance(model_fn, ctx, null, 1.0, square)(x, torch.tensor([2, 2]))
    torch.testing.assert_close(plain, (2 * x + 1.0) ** 2)


def test_site_gated_logits_hand_computed():
    # K = 4: 0 background, 1 liver, 2 lung, 3 tumour; one voxel per case
    probs = torch.tensor([[0.1, 0.6, 0.1, 0.2],    # voxel 0: inside the liver
                          [0.1, 0.05, 0.75, 0.1]])  # voxel 1: in the lung
    logits = torch.log(probs).T.unsqueeze(0).repeat(2, 1, 1)  # (B=2, K=4, 2 voxels), both cases alike
    sites = torch.tensor([[False, True, False, False], [False, False, False, False]])  # case 0: liver tumour
    out = cat.site_gated_logits(logits, sites, tumor_id=3, strength=1.0)
    assert torch.equal(out[:, :3], logits[:, :3]) and torch.equal(out[1], logits[1])  # only case 0's tumour channel
    # g = log p(liver | not tumour): voxel 0 log(0.6 / 0.8) (the maximum), voxel 1 log(0.05 / 0.9)
    shift = torch.log(torch.tensor((0.05 / 0.9) / (0.6 / 0.8)))
    torch.testing.assert_close(out[0, 3] - logits[0, 3], torch.tensor([0.0, float(shift)]))
    p = out[0].softmax(0)
    torch.testing.assert_close(p[3, 1], 0.1 * shift.exp() / (0.9 + 0.1 * shift.exp()))  # in the lung: 0.1 -> 0.008
    torch.testing.assert_close(p[3, 0], torch.tensor(0.2))  # the most liver-like voxel: unchanged
    torch.testing.assert_close(cat.site_gated_logits(logits, sites, 3, 0.0), logits)
    twice = cat.site_gated_logits(logits, sites, 3, 2.0)
    torch.testing.assert_close(twice[0, 3] - logits[0, 3], 2 * (out[0, 3] - logits[0, 3]))
    # the tumour's own probability does not count as site: a confident tumour voxel in the lung
    # (p_tumour 0.9) is gated by p(liver | not tumour) = 0.005 / 0.1 there
    lesion = torch.log(torch.tensor([[0.02, 0.6, 0.08, 0.3], [0.02, 0.005, 0.075, 0.9]])).T[None]
    gated = cat.site_gated_logits(lesion, sites[:1], 3)
    torch.testing.assert_close(gated[0, 3, 1] - lesion[0, 3, 1], torch.log(torch.tensor(0.05 / (0.6 / 0.7))))


def test_site_gated_logits_gradient_finite_with_inactive_rows():
    # Training gates the non-dropped rows only; a dropped (or site-less) row in the batch must
    # not put NaN into the gradient (it did: -inf - (-inf) behind a torch.where).
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, 4, requires_grad=True)
    sites = torch.zeros(3, 5, 2, dtype=torch.bool)
    sites[0, 1] = True           # case 0: class 1, either side
    sites[1, 2, 1] = True        # case 1: class 2, right side only (needs the midline)
    out = cat.site_gated_logits(logits, sites, tumor_id=4, strength=1.0, midline_class=3)  # case 2: inactive
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(out[2], logits[2].detach())  # the inactive row is unchanged
    assert not torch.equal(out[0, 4], logits[0, 4].detach())


def test_right_side_logit_hand_computed():
    # midline probability on axis 0 (X = 5): mass 1 at i = 1 and 3 at i = 3 -> centre 2.5
    prob = torch.zeros(1, 5, 2)
    prob[0, 1, 0], prob[0, 3, 1] = 1.0, 3.0
    z = cat.right_side_logit(prob)
    assert z.shape == (1, 5, 1)
    torch.testing.assert_close(z[0, :, 0], torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5]))
    torch.testing.assert_close(cat.right_side_logit(torch.zeros(1, 5, 2))[0, :, 0], torch.arange(5.0) - 2)  # no spine: mid-axis


def test_site_gated_logits_one_sided_site():
    # K = 4: 0 background, 1 kidney, 2 vertebrae (the midline), 3 tumour; X = 3 voxels in a row:
    # kidney at i = 0 (patient left) and i = 2 (right), spine at i = 1
    probs = torch.tensor([[0.1, 0.8, 0.0, 0.1], [0.1, 0.0, 0.8, 0.1], [0.1, 0.8, 0.0, 0.1]]).clamp_min(1e-12)
    logits = torch.log(probs).T[None]  # (1, 4, 3)
    right_kidney = torch.zeros(1, 4, 2, dtype=torch.bool)
    right_kidney[0, 1, 1] = True
    out = cat.site_gated_logits(logits, right_kidney, tumor_id=3, midline_class=2)
    # w = sigmoid(i - 1): g(i) = log(w(i) · p(kidney | not tumour)); the right kidney voxel is the max
    q = 0.8 / 0.9
    g = torch.log(torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0])) * torch.tensor([q, 1e-12 / 0.9, q]))
    torch.testing.assert_close(out[0, 3] - logits[0, 3], g - g.max(), atol=1e-4, rtol=1e-4)
    both = cat.site_gated_logits(logits, right_kidney.any(-1), tumor_id=3)  # (B, K): either side
    torch.testing.assert_close(both[0, 3, 0], both[0, 3, 2])
    with pytest.raises(GuideGenError, match="midline_class"):
        cat.site_gated_logits(logits, right_kidney, tumor_id=3)


def test_lesion_depth_hand_computed():
    # one row of 7 voxels, the organ at i = 1..5; a 3-wide box (outside the volume counts as 0):
    # means [1/3, 2/3, 1, 1, 1, 2/3, 1/3], maximum 1
    organ = torch.tensor([0.0, 1, 1, 1, 1, 1, 0])
    site = torch.stack([torch.zeros(7), organ, torch.zeros(7)])[None]  # (B=1, K=3, 7)
    site = site.log()  # lesion_depth takes log-probabilities
    depth = cat.lesion_depth(site, torch.tensor([[[0], [3], [0]]]))
    torch.testing.assert_close(depth[0], torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 2 / 3, 1 / 3]))
    # a 5-wide box: [2/5, 3/5, 4/5, 1, 4/5, 3/5, 2/5] over its maximum 1
    torch.testing.assert_close(cat.lesion_depth(site, torch.tensor([[[0], [5], [0]]]))[0],
                               torch.tensor([0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4]))
    # two requested organs are normalised each by itself: a faint one (p = 0.1) reaches 1 too
    two = torch.stack([torch.zeros(7), torch.tensor([1.0, 1, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 0, 0.1, 0.1, 0.1])])[None]
    d2 = cat.lesion_depth(two.log(), torch.tensor([[[0], [1], [1]]]))
    torch.testing.assert_close(d2[0], torch.tensor([1.0, 1, 0, 0, 1, 1, 1]))
    assert not cat.lesion_depth(site, torch.zeros(1, 3, 1, dtype=torch.long)).any()  # no box: no depth
    with pytest.raises(GuideGenError, match="odd"):
        cat.lesion_depth(site, torch.tensor([[[0], [4], [0]]]))


def test_site_gated_logits_at_lesion_scale():
    # K = 3: 0 body (fat), 1 organ, 2 tumour; 7 voxels, the organ at i = 1..5 (p ~ 1), fat around it
    p_organ = torch.tensor([0.0, 1, 1, 1, 1, 1, 0]).clamp(1e-6, 1 - 1e-6)
    logits = torch.stack([1 - p_organ, p_organ, torch.full((7,), 1e-3)]).log()[None]
    sites = torch.tensor([[False, True, False]])
    boxes = torch.tensor([[[0], [3], [0]]])
    flat = cat.site_gated_logits(logits, sites, 2)
    deep = cat.site_gated_logits(logits, sites, 2, lesion_boxes=boxes)
    bulge = cat.site_gated_logits(logits, sites, 2, lesion_boxes=boxes, bulge_classes=torch.tensor([[True, False, False]]))
    assert torch.equal(deep[:, :2], logits[:, :2]) and torch.equal(bulge[:, :2], logits[:, :2])
    # voxel scale: flat over the organ; at lesion scale the rim keeps log(2/3) of the core's odds
    torch.testing.assert_close((flat[0, 2] - logits[0, 2])[1:6], torch.zeros(5))
    torch.testing.assert_close((deep[0, 2] - logits[0, 2])[1:6], torch.log(torch.tensor([2 / 3, 1, 1, 1, 2 / 3])), atol=1e-5, rtol=0)
    # without the bulge the fat around the organ stays shut (log 1e-6 + log 1/3); with it the fat
    # next to the organ is host tissue at a third of the core's depth: log(1/3)
    assert float(deep[0, 2, 0] - logits[0, 2, 0]) < -13
    torch.testing.assert_close(bulge[0, 2] - logits[0, 2], torch.log(torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 2 / 3, 1 / 3])), atol=1e-5, rtol=0)
    # a row without boxes keeps the voxel-scale gate, bulge or not
    no_box = cat.site_gated_logits(logits, sites, 2, lesion_boxes=torch.zeros_like(boxes), bulge_classes=torch.tensor([[True, False, False]]))
    torch.testing.assert_close(no_box, flat)
    # in one batch each row keeps its own gate: [lesion scale with bulge, voxel scale]
    both = cat.site_gated_logits(logits.repeat(2, 1, 1), sites.repeat(2, 1), 2, lesion_boxes=torch.cat([boxes, torch.zeros_like(boxes)]),
                                 bulge_classes=torch.tensor([[True, False, False], [True, False, False]]))
    torch.testing.assert_close(both[0], bulge[0])
    torch.testing.assert_close(both[1], flat[0])


def test_host_refilled_logits_hand_computed():
    # K = 4: 0 fat, 1 kidney (the host), 2 bladder, 3 tumour; one voxel where matching shrank
    # the tumour from 0.5 to 0.2, one where it grew it
    before = torch.log(torch.tensor([[0.2, 0.1, 0.2, 0.5], [0.3, 0.3, 0.3, 0.1]])).T[None]  # (1, 4, 2)
    matched = before.clone()
    matched[0, 3] = torch.log(torch.tensor([0.2 / 0.8 * 0.5, 0.5 / 0.5 * 0.9]))  # tumour odds lowered / raised
    p_matched = torch.softmax(matched, 1)
    assert torch.allclose(p_matched[0, 3], torch.tensor([0.2, 0.5]))  # 0.9 against the others 0.9
    out = cat.host_refilled_logits(before, matched, torch.tensor([[False, True, False, False]]), tumor_id=3).exp()
    # voxel 0: the freed 0.3 goes to the kidney alone: fat 0.2, kidney 0.1 + 0.3, bladder 0.2, tumour 0.2
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.2, 0.4, 0.2, 0.2]))
    # voxel 1: the tumour grew, so matching's own distribution stands
    torch.testing.assert_close(out[0, :, 1], p_matched[0, :, 1])
    # plain matching would have given the bladder a share of the freed probability
    assert p_matched[0, 2, 0] > 0.2 + 1e-3
    # no host class (no requested organ): matching's output
    none = cat.host_refilled_logits(before, matched, torch.zeros(1, 4, dtype=torch.bool), tumor_id=3).exp()
    torch.testing.assert_close(none, p_matched)


def test_volume_matched_logits_hand_computed():
    # K = 2 (0 background, 1 tumour) so d = logit_tumour - logit_background; 4 voxels
    d = torch.tensor([2.0, 0.0, -1.0, -3.0])
    logits = torch.stack([torch.zeros(4), d])[None].repeat(2, 1, 1)  # (B=2, K=2, 4)
    out = cat.volume_matched_logits(logits, torch.tensor([2.0, 0.0]), tumor_id=1)
    assert torch.equal(out[1], logits[1]) and torch.equal(out[:, 0], logits[:, 0])  # target 0: unchanged
    b = (out[0, 1] - logits[0, 1])
    assert torch.allclose(b, b[0].expand(4))  # one shift for the whole case
    torch.testing.assert_close(torch.sigmoid(d + b[0]).sum(), torch.tensor(2.0))  # expected volume = target
    # solve sum sigmoid(d + b) = 2 by hand: at b = 0 the sum is 0.881 + 0.5 + 0.269 + 0.047 = 1.697 < 2
    assert 0 < float(b[0]) < 1 and float(torch.sigmoid(d).sum()) < 2
    half = cat.volume_matched_logits(logits, torch.tensor([2.0, 0.0]), tumor_id=1, strength=0.5)
    torch.testing.assert_close(half[0, 1] - logits[0, 1], b / 2)
    fewer = cat.volume_matched_logits(logits, torch.tensor([0.5, 0.0]), tumor_id=1)
    assert float((fewer[0, 1] - logits[0, 1])[0]) < 0  # asking for less lowers the tumour
    torch.testing.assert_close(torch.sigmoid(d + (fewer[0, 1] - logits[0, 1])).sum(), torch.tensor(0.5))

def test_volume_matched_logits_pools_the_tumour_evidence():
    # K = 2, one row of 5 voxels: d = [-5, 3, -5, -5, -5]; a 3-wide box without padding gives
    # [(-5 + 3) / 2, (-5 + 3 - 5) / 3, (3 - 5 - 5) / 3, -5, -5]
    d = torch.tensor([-5.0, 3.0, -5.0, -5.0, -5.0])
    logits = torch.stack([torch.zeros(5), d])[None]
    out = cat.volume_matched_logits(logits, torch.tensor([2.0]), tumor_id=1, pool=3)
    pooled = torch.tensor([-1.0, -7 / 3, -7 / 3, -5.0, -5.0])
    b = out[0, 1] - pooled
    torch.testing.assert_close(b, b[0].expand(5))  # the pooled evidence plus one shift
    torch.testing.assert_close(torch.sigmoid(out[0, 1]).sum(), torch.tensor(2.0))
    # pooling spreads the lone confident voxel's evidence to its neighbours: the top two are adjacent
    assert set(out[0, 1].topk(2).indices.tolist()) == {0, 1}
    # a 3D volume: one strong voxel in the middle of a 5^3 box pools into a 3^3 blob (each inner
    # voxel's box holds it: d = (50 - 26 * 50) / 27 = -46.3 there, -50 elsewhere)
    vol = torch.full((1, 2, 5, 5, 5), 0.0)
    vol[0, 1] = -50.0
    vol[0, 1, 2, 2, 2] = 50.0
    blob = cat.volume_matched_logits(vol, torch.tensor([27.0]), tumor_id=1, pool=3).argmax(1)[0]
    assert blob.sum() == 27 and blob[1:4, 1:4, 1:4].all()
    with pytest.raises(GuideGenError, match="odd"):
        cat.volume_matched_logits(logits, torch.tensor([2.0]), tumor_id=1, pool=2)


def test_churn_is_checked_and_zero_churn_is_the_plain_sampler():
    x0 = torch.randint(0, K, (1, 6, 6, 6), generator=torch.Generator().manual_seed(8))
    fn = _learned_like_denoiser()
    plain = cat.sample_strided(fn, tuple(x0.shape), K, ABAR, 4, generator=torch.Generator().manual_seed(9))
    zero = cat.sample_strided(fn, tuple(x0.shape), K, ABAR, 4, generator=torch.Generator().manual_seed(9), churn=0.0)
    assert torch.equal(plain, zero)
    churned = cat.sample_strided(fn, tuple(x0.shape), K, ABAR, 4, generator=torch.Generator().manual_seed(9), churn=1.0)
    assert not torch.equal(plain, churned)  # the overshoot and re-noising draw other numbers
    with pytest.raises(GuideGenError, match="churn"):
        cat.sample_strided(fn, tuple(x0.shape), K, ABAR, 4, churn=-0.1)


@pytest.mark.parametrize("width", [3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 1, 9), (1, 2, 8, 6), (2, 1, 7, 9, 8)])
def test_box_mean_equals_the_direct_box_inside_the_volume(shape, width):
    """The separable box mean equals the mean over each voxel's box ∩ volume, computed by hand."""
    import itertools

    x = torch.randn(shape, dtype=torch.float64)
    out = cat.box_mean(x, width)
    r = width // 2
    spatial = shape[2:]
    for idx in itertools.product(*[range(s) for s in spatial]):
        box = tuple(slice(max(i - r, 0), min(i + r + 1, s)) for i, s in zip(idx, spatial))
        expected = x[(slice(None), slice(None), *box)].flatten(2).mean(-1)
        torch.testing.assert_close(out[(slice(None), slice(None), *idx)], expected)
