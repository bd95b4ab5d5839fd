"""Training: the autoencoder, the diffusion transformer, distillation to few steps.

    train_cli.py           `worldmodel train autoencoder|model|throughput`: flags, run functions
    distill_cli.py         `worldmodel distill`: flags, the students and their report
    config.py              training settings (their defaults), `--set` overrides, the model config
    clips.py               training data as clips of frames or cached latents
    autoencoder.py         training the autoencoder
    transformer.py         training the diffusion transformer (Self Forcing, validation, sample strips)
    distill.py             few-step distillation: the student's updates and loop, evaluation
    distill_objectives.py  its objectives: regression, DMD, the latent critic
    runs.py                the run folder: claiming it, checkpoints, metrics and curves, export
    steps.py               what every loop steps with: DDP, amp, data order, lr schedule, EMA
"""
