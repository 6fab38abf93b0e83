"""Training: the loop, the LR schedule and checkpoints."""
