"""Training: the loop, checkpoints, evaluation, schedule."""
