"""The SFPO α schedule: α0 until the entropy z-score trigger fires, then 0 (plain GRPO) for good.

Exact rule, matched to the reference code (Urheen/SFPO, ``Code/SFPO/verl/trainer/ppo/
ray_trainer.py``, ``fit``), which keeps a list of per-step entropies and, before each update, does

    if len(entropies) >= zscore_w:
        u   = np.mean(entropies[-zscore_w:])
        std = np.std(entropies[-zscore_w:]) + 1e-9
        z   = (entropies[-1] - u) / std
        if z >= zscore_threshold: stop_SFPO = True      # this and every later update is GRPO

with the step's entropy (the actor's mean training entropy) appended *after* its update. So:

* the window is the last ω entropies **including** the newest one H_s;
* std is the **population** std (numpy's default ddof=0), plus 1e-9;
* nothing is tested until ω entropies exist (a full window);
* the test is one-sided, z ≥ τ (the paper prints |z| ≥ τ: ``two_sided=True``);
* H_s measured at step s can only affect later steps: a trigger at step s gives α = 0 from
  step s + 1 on (Algorithm 1: s* ← s + 1).

Here :meth:`SFPOController.observe` (called once per step with that step's entropy) is the
reference's append-then-test, and :meth:`alpha_for_step` answers for the next steps. The fixed
``stop_step`` ablation follows the reference demo (``stop_sfpo_step >= global_steps`` runs SFPO):
SFPO on steps ≤ stop_step, GRPO after. Unlike the reference, the window and the trigger are part
of :meth:`state_dict`, so a resumed run continues the same window and never fires twice.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from sfpo_megatron.errors import UserError

_STD_EPS = 1e-9
_STATE_VERSION = 1


class SFPOConfigError(UserError):
    """An invalid SFPO setting, step or entropy value."""


class SFPOController:
    def __init__(
        self,
        alpha0: float = 0.8,
        window: int = 30,
        threshold: float = 1.0,
        two_sided: bool = False,
        stop_step: int | None = None,
        inner_steps: int = 3,
    ) -> None:
        if not 0.0 <= alpha0 <= 1.0:
            raise SFPOConfigError(f"alpha0 (--sfpo-alpha) must be in [0, 1], got {alpha0}")
        if window < 2:
            raise SFPOConfigError(f"window (--sfpo-zscore-window) must be >= 2, got {window}")
        if not math.isfinite(threshold):
            raise SFPOConfigError(f"threshold (--sfpo-zscore-threshold) must be finite, got {threshold}")
        if inner_steps < 0:
            raise SFPOConfigError(f"inner_steps (--sfpo-inner-steps) must be >= 0, got {inner_steps}")
        if stop_step is not None and stop_step < 0:
            raise SFPOConfigError(f"stop_step (--sfpo-stop-step) must be >= 0, got {stop_step}")
        self.alpha0 = float(alpha0)
        self.window = int(window)
        self.threshold = float(threshold)
        self.two_sided = bool(two_sided)
        self.stop_step = stop_step
        self.inner_steps = int(inner_steps)
        self._history: deque[float] = deque(maxlen=self.window)
        self.last_step: int | None = None
        self.last_z: float | None = None
        self.trigger_step: int | None = None
        self.trigger_z: float | None = None

    # ---- schedule -------------------------------------------------------------------------
    @property
    def triggered(self) -> bool:
        return self.trigger_step is not None

    def alpha_for_step(self, step: int) -> float:
        """α of Algorithm 1 at rollout step ``step``; 0 means Stages I and II are skipped."""
        if self.trigger_step is not None and step > self.trigger_step:
            return 0.0
        if self.stop_step is not None and step > self.stop_step:
            return 0.0
        return self.alpha0

    def inner_steps_for_step(self, step: int) -> int:
        """K fast passes at ``step`` (0 when α is 0: the step is exactly one GRPO step)."""
        return self.inner_steps if self.alpha_for_step(step) > 0.0 else 0

    # ---- trigger --------------------------------------------------------------------------
    def _zscore(self) -> float | None:
        if len(self._history) < self.window:
            return None
        values = np.asarray(self._history, dtype=np.float64)
        mean = float(np.mean(values))
        std = float(np.std(values)) + _STD_EPS
        return float((values[-1] - mean) / std)

    def observe(self, step: int, mean_entropy: float) -> float | None:
        """Records step ``step``'s mean token entropy; returns its z-score (None: window not full).

        Fires the trigger (α = 0 from ``step + 1`` on) the first time z ≥ τ (|z| ≥ τ when
        two-sided). Later observations keep updating ``last_z`` but never move the trigger.
        """
        if self.last_step is not None and step <= self.last_step:
            raise SFPOConfigError(
                f"observe(step={step}) after step {self.last_step}: steps must increase")
        value = float(mean_entropy)
        if not math.isfinite(value):
            raise SFPOConfigError(f"mean_entropy at step {step} must be finite, got {mean_entropy}")
        self._history.append(value)
        self.last_step = step
        z = self._zscore()
        self.last_z = z
        if z is not None and self.trigger_step is None:
            hit = abs(z) >= self.threshold if self.two_sided else z >= self.threshold
            if hit:
                self.trigger_step = step
                self.trigger_z = z
        return z

    def metrics(self, step: int) -> dict[str, float]:
        """Scalars to log at ``step`` (trigger step is -1 until it fires)."""
        return {
            "sfpo/alpha": self.alpha_for_step(step),
            "sfpo/entropy_zscore": float("nan") if self.last_z is None else self.last_z,
            "sfpo/trigger_step": -1.0 if self.trigger_step is None else float(self.trigger_step),
        }

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: settings, entropy window and the trigger."""
        return {
            "version": _STATE_VERSION,
            "alpha0": self.alpha0,
            "window": self.window,
            "threshold": self.threshold,
            "two_sided": self.two_sided,
            "stop_step": self.stop_step,
            "inner_steps": self.inner_steps,
            "history": list(self._history),
            "last_step": self.last_step,
            "last_z": self.last_z,
            "trigger_step": self.trigger_step,
            "trigger_z": self.trigger_z,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the window and trigger. Settings come from the constructor (the command
        line), except that a trigger that already fired stays fired whatever they are now."""
        if state.get("version") != _STATE_VERSION:
            raise SFPOConfigError(
                f"SFPO controller state version {state.get('version')!r} is not {_STATE_VERSION}")
        history = [float(h) for h in state["history"]]
        # A resumed run with a different window keeps the newest entropies that still fit.
        self._history = deque(history[-self.window:], maxlen=self.window)
        self.last_step = state["last_step"]
        self.last_z = state["last_z"]
        self.trigger_step = state["trigger_step"]
        self.trigger_z = state["trigger_z"]
