"""Target-size mode: rate_lambda controlled during training so that the coded file lands on a size."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from .modeling import EPRModel


class SizeController:
    """Target-size mode: rate_lambda is adjusted during training so that the coded file lands on a target size.

    A PI controller on the log of the size (dual ascent with a proportional term for damping) that acts on the
    error it predicts ``horizon`` updates ahead: at every update (the trainer calls it every ``target_interval``
    optimizer steps), with B the bits of the rounded
    latents under their own histograms / 8 (``EPRModel.empirical_bits``: what the coded stream costs; the learned
    density's bits lag behind it while the latents move fast), O the overhead (below), T(t) the target at step t, e = log(B / (T(t) - O)) (the error of
    the part that lambda controls: in a model with many raw tensors a 5% file error is a 20% latent error), and
    p = e + horizon * trend (trend: the change of e per update, of the
    exact bits less the path's, smoothed over the last updates),

        I += clip(gain * p, -max_change, +max_change);   log(lambda) = I + proportional * clip(e, -1, 1).

    lambda never exceeds ``max_lambda`` (anti-windup: the integral stops there too).

    The prediction is what damps it: the latents answer a change of lambda a few hundred steps late, so a
    controller on the present error keeps raising lambda while the size is already falling fast towards the target
    and overshoots below it.

    The estimated file is S = B + O, O the overhead (tables, raw tensors, description), and the overhead is re-measured from the real coded size
    (``EPRModel.size_report``) every ``calibration`` updates and at every update in the last tenth of the schedule, so
    that the estimate equals the real size where it matters. T(t) descends from S at the first update
    to the target over the first ``ramp`` fraction of the steps, then holds: lambda grows with the size it can
    reach instead of winding up while the latents lag behind (an integral on a fixed target overshoots below it,
    and latents driven to zero do not come back). The state is a few floats (JSON), restored on resume; the
    updates are deterministic functions of the model's state, identical on every process.
    """

    STATE = ("log_lambda", "integral", "trend", "bits", "last_path", "trim", "start", "overhead", "updates", "estimate")

    def __init__(self, target: float, log_lambda: float, gain: float, max_change: float, ramp: float,
                 calibration: int, proportional: float = 0.0, horizon: float = 0.0, glide: float = 0.0,
                 max_lambda: float = math.inf):
        self.target, self.gain, self.max_change = target, gain, max_change
        self.proportional, self.horizon, self.glide = proportional, horizon, glide
        self.integral = log_lambda
        self.max_lambda = max_lambda
        self.trend: float | None = None  # smoothed change of the error per update
        self.bits: float | None = None
        self.last_path: float | None = None
        self.ramp, self.calibration = ramp, calibration
        self.log_lambda = log_lambda
        self.start: float | None = None  # estimated size at the first update
        self.overhead: float | None = None  # real bytes - bits / 8 at the last calibration
        self.updates = 0
        self.estimate: float | None = None
        self.trim = 0.0  # shift of every log step size applied at the end (see trim_to_target)

    @property
    def rate_lambda(self) -> float:
        return math.exp(self.log_lambda)

    def path(self, step: int, max_steps: int) -> float:
        """The size target at ``step``. Over the ramp (s = step / ramp steps) it descends from the starting size to
        (1 + glide) x target, in log size along 1 - (1 - s)^2: fast at first, where the size falls by itself as the
        step sizes grow, and flat at the end, so that the size arrives without momentum. Then it glides down to the
        target, reached at the last step: in the annealing end of the schedule the size keeps
        falling by itself and lowering lambda hardly raises it again, so the controller should meet the target
        from above, pushing down."""
        if self.start is None or self.start <= self.target:
            return self.target
        ramp_steps = self.ramp * max_steps
        high = math.log(self.target * (1 + self.glide))
        if step < ramp_steps:
            s = 1 - (1 - step / ramp_steps) ** 2
            return math.exp((1 - s) * math.log(self.start) + s * high)
        s = min(1.0, (step - ramp_steps) / max(1.0, max_steps - ramp_steps))
        return math.exp((1 - s) * high + s * math.log(self.target))

    def needs_real_size(self, step: int, max_steps: int) -> bool:
        return self.overhead is None or self.updates % self.calibration == 0 or step >= 0.9 * max_steps

    def update(self, step: int, max_steps: int, bits: float, real_bytes: float | None) -> float:
        """One controller step; returns the new rate_lambda."""
        if real_bytes is not None:
            self.overhead = real_bytes - bits / 8
        self.estimate = bits / 8 + self.overhead
        if self.start is None:
            self.start = self.estimate
        path = self.path(step, max_steps)
        # the error of the part lambda controls: the latents' bits against the budget the overhead leaves them
        budget = path - self.overhead
        error = math.log(max(bits / 8, 1.0) / budget) if budget > 1.0 else 1.0
        if self.bits is not None:  # trend of the error per update: of the bits (no calibration jumps), less the path's
            change = math.log(max(bits, 1.0) / max(self.bits, 1.0)) - math.log(path / self.last_path)
            self.trend = change if self.trend is None else 0.5 * self.trend + 0.5 * change
        self.bits, self.last_path = bits, path
        predicted = error + self.horizon * (self.trend or 0.0)
        self.integral += max(-self.max_change, min(self.max_change, self.gain * predicted))
        self.integral = min(self.integral, math.log(self.max_lambda))
        self.log_lambda = min(self.integral + self.proportional * max(-1.0, min(1.0, error)), math.log(self.max_lambda))
        self.updates += 1
        return self.rate_lambda

    def size_error(self) -> float | None:
        """Estimated size / final target - 1 at the last update."""
        return None if self.estimate is None else self.estimate / self.target - 1

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE:
            if k in state:
                setattr(self, k, state[k])


class TargetSizeCallback(TrainerCallback):
    """Runs the trainer's size controller after every ``target_interval``-th optimizer step."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.target_interval == 0:
            self.trainer.update_rate_lambda(state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.trim_to_target()



@torch.no_grad()
def trim_to_target(epr: EPRModel, controller: SizeController, goal: float, iterations: int = 24
                   ) -> tuple[float, float, float]:
    """At the end of training: if the real coded size is off the controller's target by more than ``goal``
    (relative), scale every quantization step by one common factor (a bisection on a shift of all log step sizes:
    coarser steps, fewer bits) until it is within, or as close as it gets. The decoded weights stay where they were,
    re-rounded on the new grid, so the function changes little; the controller has done the rest.
    Returns (applied shift of log(step), size error before, size error after)."""
    with epr.full_parameters():
        size = lambda: float(epr.size_report()["total_bytes"])  # noqa: E731
        error = size() / controller.target - 1
        best = (abs(error), 0.0)
        if abs(error) > goal:
            log_steps = [t.log_step for t in epr.latent_tensors()]  # views into the decoders' parameters
            base = [v.clone() for v in log_steps]

            def shift_by(d: float) -> None:
                for v, b in zip(log_steps, base):
                    v.copy_(b + d)

            lo, hi = (0.0, 1.0) if error > 0 else (-1.0, 0.0)
            for _ in range(iterations):
                mid = (lo + hi) / 2
                shift_by(mid)
                e = size() / controller.target - 1
                best = min(best, (abs(e), mid))
                if abs(e) <= goal:
                    break
                lo, hi = (mid, hi) if e > 0 else (lo, mid)
            shift_by(best[1])
        final = size() / controller.target - 1 if best[1] else error
    controller.trim = best[1]
    return best[1], error, final
