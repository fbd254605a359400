"""Training: the REPA-E step, the loop, checkpoints, EMA."""
