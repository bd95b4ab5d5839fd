"""The engine: its settings, WorldModel (the per-frame loop), the frame pipeline, the gym env, model loading."""
