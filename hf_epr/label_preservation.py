"""Adaptive coefficients of the label preservation loss terms (the "auto" policy of EPRTrainer)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .modeling import host_floats


class SoftAdapt:
    """Loss-weighted SoftAdapt (Heydari et al. 2019) over the non-rate loss terms.

    Every ``interval`` calls, with m_i the mean of term i over the last interval and p_i over the one before:
    slopes s_i = m_i / p_i - 1 (relative rates of change), normalized by max|s|; weights
    w_i = n * softmax(beta * s)_i * m_i / sum_j softmax(beta * s)_j * m_j (n terms, so sum w = n). A term that
    stops falling (or rises) and a term that is large both get more weight. Before the second interval all
    weights are 1. ``reduce`` maps each interval's local means to global ones (mean over processes), so every
    rank of a distributed run holds the same weights.
    """

    def __init__(self, names: list[str], beta: float, interval: int,
                 reduce: Callable[[list[float]], list[float]] | None = None):
        self.names, self.beta, self.interval = names, beta, interval
        self.reduce = reduce or (lambda values: values)
        self.weights = {n: 1.0 for n in names}
        self.sums: dict[str, Any] = {n: 0.0 for n in names}
        self.count = 0
        self.previous: dict[str, float] | None = None

    def update(self, values: dict[str, Any]) -> None:
        """Add one step's term values (floats or 0-dim tensors, summed where they are: no device sync); recompute
        the weights at the end of each interval (one sync)."""
        for n in self.names:
            self.sums[n] = self.sums[n] + values[n]
        self.count += 1
        if self.count < self.interval:
            return
        local = [v / self.count for v in host_floats([self.sums[n] for n in self.names])]
        means = dict(zip(self.names, self.reduce(local)))
        if self.previous is not None:
            slopes = np.array([means[n] / max(self.previous[n], 1e-12) - 1.0 for n in self.names])
            slopes = slopes / max(np.abs(slopes).max(), 1e-12)
            soft = np.exp(self.beta * (slopes - slopes.max()))
            w = soft * np.array([means[n] for n in self.names])
            w = len(self.names) * w / max(w.sum(), 1e-12)
            if np.all(np.isfinite(w)):
                self.weights = {n: float(v) for n, v in zip(self.names, w)}
        self.previous, self.sums, self.count = means, {n: 0.0 for n in self.names}, 0

    def state_dict(self) -> dict[str, Any]:
        sums = dict(zip(self.names, host_floats([self.sums[n] for n in self.names])))
        return {"weights": self.weights, "sums": sums, "count": self.count, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.sums = state["weights"], state["sums"]
        self.count, self.previous = state["count"], state["previous"]
