"""The engine: the sampler, WorldModel (the per-frame loop), the frame pipeline, the gym env, model loading."""
