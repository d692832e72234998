"""Training: optimizer, loss, train step, checkpoints, metrics and the loop."""
