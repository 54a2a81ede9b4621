"""Our anatomy-aware autoencoder vs MONAI's reference ``AutoencoderKL`` of the same widths (issue 10).

Times one training step (forward, L1 + KL, backward, AdamW) of each on the same input, batch 1,
in one process, alternating the two so machine noise hits both alike; prints parameter counts,
median seconds per step and the ratio. MONAI's model is built with the same channels, latent
channels and res blocks, GroupNorm, no attention (ours has none); ours adds the label pyramid.

    python benchmarks/ae_vs_monai.py [--config demo] [--grid 32,32,32] [--steps 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def step_time(model_step, opt) -> float:
    t0 = time.perf_counter()
    loss = model_step()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--grid", default=None, help="X,Y,Z (default: the config's autoencoder.train_crop or data.grid)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from monai.networks.nets import AutoencoderKL

    from guidegen.config import load_config
    from guidegen.labels import load_label_set
    from guidegen.models.autoencoder import AnatomyAwareAutoencoder

    cfg = load_config(args.config)
    ac = cfg.autoencoder
    grid = tuple(int(v) for v in args.grid.split(",")) if args.grid else tuple(ac.train_crop or cfg.data.grid)
    k = load_label_set(cfg.data.label_set).num_classes
    torch.manual_seed(0)
    ours = AnatomyAwareAutoencoder.from_config(ac, k)
    groups = min(8, *ac.channels)
    ref = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(ac.channels),
                        num_res_blocks=ac.num_res_blocks, attention_levels=(False,) * len(ac.channels),
                        latent_channels=ac.latent_channels, norm_num_groups=groups,
                        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    x = torch.rand(1, 1, *grid) * 2 - 1
    labels = torch.randint(0, k, (1, *grid))
    opt_ours, opt_ref = torch.optim.AdamW(ours.parameters(), 1e-4), torch.optim.AdamW(ref.parameters(), 1e-4)

    def ours_step():
        recon, post = ours(x, labels)
        return (recon - x).abs().mean() + 1e-6 * post.kl().mean()

    def ref_step():
        recon, mu, sigma = ref(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
        return (recon - x).abs().mean() + 1e-6 * kl

    for f, o in ((ours_step, opt_ours), (ref_step, opt_ref)):  # warm-up
        step_time(f, o)
    t_ours, t_ref = [], []
    for _ in range(args.steps):
        t_ours.append(step_time(ours_step, opt_ours))
        t_ref.append(step_time(ref_step, opt_ref))
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); grid {grid}, batch 1")
    print(f"ours  (AnatomyAwareAutoencoder, {n(ours):.2f} M params, label pyramid): {mo:.2f} s/step")
    print(f"MONAI (AutoencoderKL same widths, {n(ref):.2f} M params):              {mr:.2f} s/step")
    print(f"ratio ours / MONAI: {mo / mr:.2f}")


if __name__ == "__main__":
    main()
