"""Target-size mode's parts on their own: the controller's determinism and the end-of-training trim."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.target_size import SizeController, trim_to_target
from hf_epr.testing import tiny_inputs, tiny_model, train_a_few_steps


def test_size_controller_is_deterministic_and_resumable():
    """Same inputs, same lambdas; a controller restored from its JSON state continues identically."""
    def run(ctl, steps, sizes):
        return [ctl.update(s, 100, 8 * b, b + 50.0 if s % 30 == 10 else None) for s, b in zip(steps, sizes)]

    sizes = [4000.0 * 0.97 ** i for i in range(10)]
    steps = list(range(10, 110, 10))
    make = lambda: SizeController(1000.0, math.log(0.5), 0.05, 0.1, 0.5, 3, 1.0)  # noqa: E731
    full = run(make(), steps, sizes)
    first = make()
    run(first, steps[:4], sizes[:4])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(resumed, steps[4:], sizes[4:]) == full[4:]
    assert full == run(make(), steps, sizes)
    assert full[-1] > full[0]  # above its target the size pushes lambda up


@pytest.mark.parametrize("scale", [0.93, 1.07])
def test_trim_lands_a_file_on_its_target(scale):
    """A file 7% off its target (either way) is trimmed to within the goal by one common step-size shift."""
    torch.manual_seed(0)
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(rate_lambda=0.05))
    train_a_few_steps(model, tiny_inputs("resnet"))
    before = model.size_report()["total_bytes"]
    controller = SizeController(scale * before, 0.0, 0.3, 0.1, 0.5, 10)
    shift, error, after = trim_to_target(model, controller, goal=0.01)
    assert error == pytest.approx(1 / scale - 1)
    assert abs(after) <= 0.01 and (shift > 0) == (scale < 1) and controller.trim == shift
    assert model.size_report()["total_bytes"] == pytest.approx(scale * before, rel=0.01)
