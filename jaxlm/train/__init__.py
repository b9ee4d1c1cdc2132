"""Training: optimizer, loss, the pure train step, checkpoints, metrics and the loop."""
