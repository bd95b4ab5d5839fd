"""The model: the autoencoder, the diffusion transformer, the noise schedule, the checkpoint format."""
