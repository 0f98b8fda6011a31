"""DeepSpeed training loop, objectives, checkpoints and metrics."""
