"""``--budget``: fit a run to the minutes you have.

A budget is a wall-clock duration (``90s``, ``30m``, ``2h``, ``1h30m``;
``config.duration_seconds`` reads it) for the whole of ``vitcraft train``: set-up, training, one evaluation per epoch
and the figures at the end. The training loop measures a few steps and a part
of an evaluation first (``train.calibrate``), then ``plan`` turns those times
into a number of steps; the learning-rate schedule ends at the last of them,
so it stays a pure function of the step. If the machine slows down, the
``Deadline`` says so in time for the run to stop early, evaluate and save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from vitcraft.errors import VitcraftError

FIGURE_SECONDS = 5.0  # drawing the figures besides their evaluation pass: small, and alike for every model


@dataclass(frozen=True)
class Plan:
    """How a run spends its budget: ``steps`` optimizer steps in ``epochs`` epochs (the last maybe partial).

    From the calibrated seconds per step and per evaluation; ``seconds`` is what
    the plan expects to take from now, within ``available``.
    """

    steps: int
    epochs: int
    step_seconds: float
    eval_seconds: float
    final_seconds: float  # what the run does after its last epoch: the figures
    available: float

    @property
    def seconds(self) -> float:
        return self.steps * self.step_seconds + self.epochs * self.eval_seconds + self.final_seconds

    def line(self) -> str:
        return (f"budget plan: {self.steps:,} steps in {self.epochs} epoch(s), about {self.seconds / 60:.1f} of the "
                f"{self.available / 60:.1f} minutes left ({self.step_seconds:.3f} s per step, "
                f"{self.eval_seconds:.1f} s per evaluation)")


def plan(available: float, step_seconds: float, eval_seconds: float, steps_per_epoch: int,
         final_seconds: float = 0.0) -> Plan:
    """The most steps whose training, one evaluation per (started) epoch and ``final_seconds`` fit ``available``.

    At least one step: a budget too short for even that is an error.
    """
    step_seconds = max(step_seconds, 1e-6)  # a clock too coarse to see a step must not plan without end

    def cost(steps: int) -> float:
        return steps * step_seconds + math.ceil(steps / steps_per_epoch) * eval_seconds + final_seconds

    per_step = step_seconds + eval_seconds / steps_per_epoch  # evaluations spread over the steps
    steps = max(0, int((available - final_seconds - eval_seconds) / per_step))  # near the most: then exact
    while steps > 0 and cost(steps) > available:
        steps -= 1
    while cost(steps + 1) <= available:
        steps += 1
    if steps < 1:
        need = step_seconds + eval_seconds + final_seconds
        raise VitcraftError(f"the budget leaves {available:.0f} s after set-up, and one step with its evaluation "
                            f"takes about {need:.0f} s here: give a longer --budget")
    return Plan(steps, math.ceil(steps / steps_per_epoch), step_seconds, eval_seconds, final_seconds, available)


class Deadline:
    """When a run's budget ends, and whether what is left still holds one more step and the work after it.

    ``reserve``: what the run does after its last step (an evaluation, the figures).
    """

    def __init__(self, seconds: float, step_seconds: float, reserve: float, clock=time.perf_counter):
        self.clock = clock
        self.end = clock() + seconds
        self.step_seconds, self.reserve = step_seconds, reserve

    def left(self) -> float:
        return self.end - self.clock()

    def must_stop(self, steps: int = 1) -> bool:
        """Whether ``steps`` more steps (those until the next look at the clock) would eat into the reserve."""
        return self.left() < steps * self.step_seconds + self.reserve
