"""The model: the autoencoder, the diffusion transformer and its KV cache, the noise schedule, the sampler
(a frame in `steps` denoising passes), the checkpoint format."""
