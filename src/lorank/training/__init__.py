"""Training: the run config, the trainer (which knows no method by name), checkpoints,
run directories, evaluation and ``torchrun`` support."""
