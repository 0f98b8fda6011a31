"""Data sources that feed the trainer per-step micro-batches."""
