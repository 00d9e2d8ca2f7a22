"""Training utilities: distributed helpers, optimizer, schedule, checkpoints, the epoch loop."""
