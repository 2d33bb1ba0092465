"""Training: schedules, EMA, checkpoints, the loop, distributed launch (issue 5)."""
