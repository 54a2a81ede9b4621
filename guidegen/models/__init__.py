"""Networks: TCSS denoiser, autoencoder, latent UNet, discriminators, segmenter."""
