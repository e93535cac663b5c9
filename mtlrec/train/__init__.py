"""Training loop, metrics, checkpoints and the end-to-end run."""
