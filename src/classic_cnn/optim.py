"""Optimizers (how a gradient becomes a weight update) and learning-rate schedules.

An optimizer's :meth:`Optimizer.step` takes two dicts with the same keys, parameters and their
gradients (``model.parameters()`` and ``model.gradients()``), and updates the parameters in
place. Its state (momentum buffers, Adam's moments, the step count) is keyed by parameter
name and can be saved with :meth:`Optimizer.state_dict`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import ops


def _check(value, arg: str, low: float, high: float = math.inf, low_open=False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low}" + (f" and ≤ {high}" if high < math.inf else "")
        raise ValueError(f"{arg} must be a number {bound}. Received: {arg}={value!r}")
    return float(value)


class Optimizer:
    def __init__(self, lr: float):
        self.lr = _check(lr, "lr", 0.0, low_open=True)
        self.iterations = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        missing = set(params) - set(grads)
        if missing:
            raise ValueError(
                f"no gradient for {sorted(missing)}: call model.backward() before step(). "
                f"Received gradients for: {sorted(grads)}"
            )
        self.iterations += 1
        for name, p in params.items():
            self._update(name, p, grads[name])

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"lr": self.lr}

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: config, step count and per-parameter state."""
        return {
            "config": self.get_config(),
            "iterations": self.iterations,
            "state": {n: {k: v.copy() for k, v in s.items()} for n, s in self.state.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        self.lr = float(sd["config"]["lr"])
        self.iterations = int(sd["iterations"])
        self.state = {n: {k: np.array(v) for k, v in s.items()} for n, s in sd["state"].items()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch's form.

    Plain: ``w ← w − lr·g`` with ``g = dL/dW`` — exactly, nothing else added.
    Weight decay (L2): ``g ← g + weight_decay·w``.
    Momentum μ: ``v ← μ·v + g``, ``w ← w − lr·v``; Nesterov: ``w ← w − lr·(g + μ·v)``. A
    velocity below the dtype's smallest normal number (1.2e-38 in float32) is set to 0:
    subnormal numbers cost the CPU about 30 times more (see ``ops.sgd_momentum_step``).
    """

    def __init__(
        self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay=0.0
    ):
        super().__init__(lr)
        self.momentum = _check(momentum, "momentum", 0.0, 1.0)
        self.weight_decay = _check(weight_decay, "weight_decay", 0.0)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0. Received: momentum=0, nesterov=True")
        self.nesterov = bool(nesterov)

    def _update(self, name, p, g):
        s = self.state.setdefault(name, {}) if self.momentum else None
        if s and "velocity" in s and p.flags.c_contiguous and p.dtype in (np.float32, np.float64):
            # the usual step: one compiled pass over p, g and v, the same numbers as below
            t = p.dtype.type
            v = s["velocity"]
            g = np.ascontiguousarray(g, dtype=p.dtype).reshape(-1)
            args = t(self.lr), t(self.momentum), t(self.weight_decay), self.nesterov
            ops.sgd_momentum_step(p.reshape(-1), g, v.reshape(-1), *args)
            return
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            if "velocity" not in s:
                s["velocity"] = g.copy()  # PyTorch starts the buffer at the first gradient
            else:
                v = s["velocity"]
                v *= self.momentum
                v += g
            v = s["velocity"]
            v[np.abs(v) < np.finfo(v.dtype).tiny] = 0  # no subnormal velocities
            g = g + self.momentum * v if self.nesterov else v
        p -= self.lr * g

    def get_config(self):
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


class Adam(Optimizer):
    """Adam: per-weight steps from running means of the gradient and its square.

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``w ← w − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + eps)``.
    ``weight_decay`` is L2 (added to the gradient, as PyTorch's Adam); see :class:`AdamW`.
    """

    decoupled = False

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        self.beta1 = _check(beta1, "beta1", 0.0, 1.0)
        self.beta2 = _check(beta2, "beta2", 0.0, 1.0)
        self.eps = _check(eps, "eps", 0.0, low_open=True)
        self.weight_decay = _check(weight_decay, "weight_decay", 0.0)

    def _update(self, name, p, g):
        if self.weight_decay:
            if self.decoupled:
                p -= (self.lr * self.weight_decay) * p
            else:
                g = g + self.weight_decay * p
        s = self.state.setdefault(name, {})
        if "m" not in s:
            s["m"] = np.zeros_like(p)
            s["v"] = np.zeros_like(p)
        m, v = s["m"], s["v"]
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        t = self.iterations
        bias1 = 1 - self.beta1**t
        bias2 = 1 - self.beta2**t
        denom = np.sqrt(v) / math.sqrt(bias2) + self.eps
        p -= (self.lr / bias1) * (m / denom)

    def get_config(self):
        return {
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


class AdamW(Adam):
    """Adam with decoupled weight decay: ``w ← w − lr·weight_decay·w`` before the Adam step."""

    decoupled = True

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
        super().__init__(lr, beta1, beta2, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


# --------------------------------------------------------------------------------------------
# Learning-rate schedules: callables from an epoch (or step) number, counted from 0, to a lr.
# --------------------------------------------------------------------------------------------


class Schedule:
    def __call__(self, t: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        return dict(vars(self))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    def __init__(self, lr: float):
        self.lr = _check(lr, "lr", 0.0, low_open=True)

    def __call__(self, t):
        return self.lr


class StepDecay(Schedule):
    """``lr · gamma^(t // step_size)``: multiply by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = _check(lr, "lr", 0.0, low_open=True)
        if not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"step_size must be a positive int. Received: step_size={step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _check(gamma, "gamma", 0.0, low_open=True)

    def __call__(self, t):
        return self.lr * self.gamma ** (t // self.step_size)


class CosineDecay(Schedule):
    """Linear warm-up over ``warmup`` steps, then half a cosine from ``lr`` to ``min_lr`` at
    ``total``: ``min_lr + (lr − min_lr)·(1 + cos(π·progress)) / 2``."""

    def __init__(self, lr: float, total: int, min_lr: float = 0.0, warmup: int = 0):
        self.lr = _check(lr, "lr", 0.0, low_open=True)
        if not isinstance(total, numbers.Integral) or total < 1:
            raise ValueError(f"total must be a positive int. Received: total={total!r}")
        if not isinstance(warmup, numbers.Integral) or not 0 <= warmup < total:
            raise ValueError(f"warmup must be an int in [0, total). Received: warmup={warmup!r}")
        self.total = int(total)
        self.min_lr = _check(min_lr, "min_lr", 0.0, self.lr)
        self.warmup = int(warmup)

    def __call__(self, t):
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        progress = min((t - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class OneCycle(Schedule):
    """One-cycle learning rate, stepped every batch (``per_step``): a cosine rise from
    ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of ``total`` steps, then a
    cosine fall to ``max_lr / final_div_factor`` (PyTorch's OneCycleLR).

    ``momentum_range=(base, max)`` also cycles the optimizer's momentum (SGD's ``momentum``,
    Adam's ``beta1``) the other way, as OneCycleLR does by default with (0.85, 0.95): from
    ``max`` down to ``base`` while the rate rises, back up to ``max`` while it falls. None (the
    default here) leaves the momentum alone."""

    per_step = True

    def __init__(
        self,
        max_lr: float,
        total: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        momentum_range: tuple[float, float] | None = None,
    ):
        self.max_lr = _check(max_lr, "max_lr", 0.0, low_open=True)
        if not isinstance(total, numbers.Integral) or total < 2:
            raise ValueError(f"total must be an int ≥ 2 (steps). Received: total={total!r}")
        self.total = int(total)
        self.pct_start = _check(pct_start, "pct_start", 0.0, 1.0, low_open=True)
        self.div_factor = _check(div_factor, "div_factor", 1.0)
        self.final_div_factor = _check(final_div_factor, "final_div_factor", 1.0)
        if momentum_range is not None:
            ok = (
                isinstance(momentum_range, (tuple, list))
                and len(momentum_range) == 2
                and all(isinstance(m, numbers.Real) for m in momentum_range)
                and 0.0 <= momentum_range[0] <= momentum_range[1] < 1.0
            )
            if not ok:
                raise ValueError(
                    "momentum_range must be (base, max) with 0 ≤ base ≤ max < 1, e.g. (0.85, 0.95)."
                    f" Received: momentum_range={momentum_range!r}"
                )
            momentum_range = (float(momentum_range[0]), float(momentum_range[1]))
        self.momentum_range = momentum_range

    def _phase(self, t):
        """(phase, progress): 0 while the rate rises, 1 while it falls."""
        peak = max(round(self.pct_start * self.total) - 1, 1)
        t = min(t, self.total - 1)
        if t <= peak:
            return 0, t / peak
        return 1, (t - peak) / max(self.total - 1 - peak, 1)

    def __call__(self, t):
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        phase, progress = self._phase(t)
        lo, hi = (start, self.max_lr) if phase == 0 else (self.max_lr, end)
        return _cosine(lo, hi, progress)

    def momentum(self, t):
        """The momentum for step ``t``; only with ``momentum_range``."""
        if self.momentum_range is None:
            raise ValueError("this OneCycle has no momentum_range: it leaves the momentum alone")
        base, top = self.momentum_range
        phase, progress = self._phase(t)
        return _cosine(top, base, progress) if phase == 0 else _cosine(base, top, progress)


def _cosine(lo, hi, progress):
    """From ``lo`` at progress 0 to ``hi`` at progress 1 along half a cosine."""
    return hi + (lo - hi) * (1 + math.cos(math.pi * progress)) / 2
