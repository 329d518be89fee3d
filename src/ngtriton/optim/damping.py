"""The Levenberg–Marquardt damping rule: λ follows the reduction ratio ρ of each step."""

from __future__ import annotations

from dataclasses import dataclass

# Where the damping restarts when a bad step must raise it from exactly 0 (floor = 0).
RESTART_DAMPING = 1e-4


@dataclass(frozen=True)
class DampingRule:
    """λ ← λ·``increase`` if ρ < 1/4 (or ρ is NaN), λ ← λ·``decrease`` if ρ > 3/4, clipped to
    ``[floor, ceiling]``; a fixed λ when not ``adaptive``. Pure: every method returns the new λ.
    """

    adaptive: bool
    floor: float
    ceiling: float
    increase: float
    decrease: float

    def clip(self, lam: float) -> float:
        return min(max(lam, self.floor), self.ceiling)

    def bump(self, lam: float) -> float:
        """λ after a bad step (from exactly 0: restart at 1e-4)."""
        if not self.adaptive:
            return lam
        up = lam * self.increase
        return self.clip(up if up > 0 else RESTART_DAMPING)

    def update(self, lam: float, rho: float) -> float:
        """λ after a step whose reduction ratio was ``rho``."""
        if not self.adaptive:
            return lam
        if not rho >= 0.25:
            return self.bump(lam)
        if rho > 0.75:
            return self.clip(lam * self.decrease)
        return lam
