"""The training loop's learning-rate schedule and time budget (invemb.training.loop.Trainer).

Cosine: linear warm-up over warmup_steps, then a cosine from lr to min_lr that ends at `total` steps. `total` is
max_steps (capped by the epochs), or under fit_to_time the steps that the measured pace fits before max_minutes,
re-estimated every FIT_EVERY steps. max_minutes is a budget of the whole run: the seconds spent before a checkpoint
are carried in its state (with the fitted total), so a resumed run continues the same schedule and stops at the
same deadline as the uninterrupted one (the time between the last checkpoint and a kill is not counted).
"""
from __future__ import annotations

import math
import time

from invemb.config import TrainConfig

FIT_EVERY = 50  # steps between re-estimates of the schedule's length under fit_to_time


class Schedule:
    """State: `total` (the cosine's end, in optimizer steps) and the budget seconds spent by earlier processes."""

    def __init__(self, cfg: TrainConfig, cap: int, state: dict | None = None):
        """cap: max_steps / epochs in steps; state: the resumed checkpoint's loop state (None: a fresh run)."""
        self.cfg, self.cap = cfg, cap
        state = state or {}
        # a checkpoint from before these fields: its training wall time is the budget spent, and the end is fitted
        # to the pace of the whole run so far (until the first re-fit measures this process's)
        self.spent_before = float(state.get("budget_spent_s", state.get("wall_total_s", 0.0)))
        self.total = cap
        if cfg.fit_to_time and state.get("schedule_total"):
            self.total = max(1, min(cap, int(state["schedule_total"])))
        elif cfg.fit_to_time and cfg.max_minutes > 0 and state.get("step") and self.spent_before > 0:
            self._fit(state["step"], state["step"], self.spent_before, self.spent_before)
        self.t_start, self.first_step = time.monotonic(), 0

    def start(self, step: int) -> None:
        """The clock of this process starts (called right before its first training step)."""
        self.t_start, self.first_step = time.monotonic(), step

    def spent(self) -> float:
        """Budget seconds of the whole run so far (earlier processes + this one)."""
        return self.spent_before + time.monotonic() - self.t_start

    def out_of_time(self) -> bool:
        return self.cfg.max_minutes > 0 and self.spent() >= 60 * self.cfg.max_minutes

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, self.total - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    def after_step(self, step: int) -> bool:
        """Under fit_to_time, re-fit `total` every FIT_EVERY steps; True when it was re-fitted."""
        if not (self.cfg.fit_to_time and self.cfg.max_minutes > 0 and step % FIT_EVERY == 0):
            return False
        self.fit(step)
        return True

    def fit(self, step: int) -> None:
        """total := the steps that this process's pace (validation and saves included) fits in what is left of the
        run's budget; never beyond the cap, and at least the next step. The pace is this process's (a resumed run
        may run on another machine); the budget is the run's."""
        elapsed = time.monotonic() - self.t_start
        self._fit(step, step - self.first_step, elapsed, self.spent_before + elapsed)

    def _fit(self, step: int, done: int, elapsed: float, spent: float) -> None:
        """total := step + the steps that `done` steps per `elapsed` seconds fit in the budget left after `spent`."""
        left = max(0.0, 60 * self.cfg.max_minutes - spent)
        self.total = max(step + 1, min(self.cap, step + int(left * done / max(elapsed, 1e-9))))

    def state(self) -> dict:
        """What a checkpoint stores to resume this schedule."""
        return {"schedule_total": self.total, "budget_spent_s": self.spent()}
