"""Training: the autoencoder, the diffusion transformer, distillation to few steps."""
