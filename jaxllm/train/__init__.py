"""Training: steps, loops, optimizers, checkpoints."""
