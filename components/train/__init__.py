"""Stage 3: the trainer (AMP, DDP, checkpoints, schedule)."""
