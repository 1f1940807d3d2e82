"""The latency gate's statistics: how much a model's speed-up changed, with a distribution-free interval.

Each bench round times the model and the float32 reference back to back, so one round gives one paired
speed-up (reference time / model time) in which the machine's speed of that moment cancels. A run is a
sample of such speed-ups. Two runs (the baseline and now) are compared on the log scale with the
Hodges–Lehmann shift (the median of all pairwise differences) and its Moses confidence interval, the
interval that inverts the Mann–Whitney test (the test asv uses to compare benchmark runs). Neither
assumes normal noise, and a minority of disturbed rounds moves neither: a busy machine widens the
interval instead of moving it, which is what lets the gate answer "inconclusive" rather than a false
"fail".

Written here rather than taken from scipy: scipy gives the Mann–Whitney p-value but not the interval of
the shift, which needs the exact null distribution's quantile; that distribution is a short recurrence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
EXACT_LIMIT = 900  # n·m up to which the exact distribution is used; the normal approximation beyond


@dataclass(frozen=True)
class ShiftEstimate:
    """Relative change of the new sample against the old one, as fractions (−0.2: 20% lower)."""

    change: float
    low: float
    high: float
    confidence: float
    new_count: int
    old_count: int

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


@lru_cache(maxsize=None)
def _mann_whitney_null(n: int, m: int) -> tuple[float, ...]:
    """P(U = u) for u = 0 … n·m under the null, for samples of sizes n and m.

    The recurrence p(u; n, m) = n/(n+m) · p(u − m; n − 1, m) + m/(n+m) · p(u; n, m − 1) (the largest
    value comes from the first sample, beating all m of the second, or from the second), with p = [1]
    when either sample is empty.
    """
    if n == 0 or m == 0:
        return (1.0,)
    first, second = _mann_whitney_null(n - 1, m), _mann_whitney_null(n, m - 1)
    result = np.zeros(n * m + 1)
    result[m:m + len(first)] += n / (n + m) * np.asarray(first)
    result[:len(second)] += m / (n + m) * np.asarray(second)
    return tuple(result.tolist())


def lower_critical_value(n: int, m: int, tail: float) -> int:
    """The largest C with P(U ≤ C − 1) ≤ tail under the null, so the Moses interval is the C-th smallest to
    the C-th largest pairwise difference; 0 when the samples are too small for that confidence."""
    if n * m <= EXACT_LIMIT:
        cumulative = np.cumsum(_mann_whitney_null(n, m))
        # The first u with P(U ≤ u) > tail; the 1e-12 absorbs float rounding at exact tail values.
        return int(np.searchsorted(cumulative, tail + 1e-12, side="right"))
    from scipy.stats import norm

    mean, sd = n * m / 2, math.sqrt(n * m * (n + m + 1) / 12)
    return max(0, int(math.floor(mean + norm.ppf(tail) * sd + 0.5)))


def log_shift_interval(new: list[float], old: list[float], confidence: float = 0.95) -> ShiftEstimate:
    """Hodges–Lehmann change of `new` against `old` (positive samples, e.g. speed-ups) on the log scale,
    with its two-sided Moses interval at `confidence`; infinite ends when the samples are too few."""
    if not new or not old:
        raise ValueError("both samples need at least one value")
    x, y = np.log(np.asarray(new, dtype=float)), np.log(np.asarray(old, dtype=float))
    differences = np.sort((x[:, None] - y[None, :]).ravel())
    tail = (1 - confidence) / 2
    critical = lower_critical_value(len(x), len(y), tail)
    if critical == 0:
        low, high = -math.inf, math.inf
    else:
        low, high = math.expm1(differences[critical - 1]), math.expm1(differences[-critical])
    return ShiftEstimate(math.expm1(float(np.median(differences))), low, high, confidence, len(x), len(y))


def verdict(estimate: ShiftEstimate, tolerance: float) -> str:
    """pass: even the interval's worst end is a slowdown within the tolerance; fail: even its best end
    is a slowdown beyond it; inconclusive: the interval straddles the tolerance."""
    if estimate.low >= -tolerance:
        return PASS
    if estimate.high < -tolerance:
        return FAIL
    return INCONCLUSIVE
