"""The learning rate of each training step: an optional linear warm-up, then constant or cosine decay.

A step's rate is a function of the global step alone, so a resumed run continues the schedule
where it stopped, and the history records each epoch's rate."""
import math

LR_SCHEDULES = ("constant", "cosine")
# Cosine decay ends at this share of the peak rather than at zero, where the last steps would teach nothing.
FINAL_LR_FRACTION = 0.1


def learning_rate_at(step: int, total_steps: int, peak: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The rate of 0-based `step` of `total_steps`: rising linearly to `peak` over `warmup_steps`,
    then `peak` throughout ('constant') or falling along a half cosine to FINAL_LR_FRACTION of it."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
