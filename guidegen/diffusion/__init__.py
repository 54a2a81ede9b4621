"""Diffusion processes and samplers (pure math, no models): categorical (TCSS) and Gaussian (latent)."""
