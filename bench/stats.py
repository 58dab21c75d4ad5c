"""Small statistics for the bench: nearest-rank percentiles, median and spread."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["percentile", "Spread", "spread"]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Spread:
    """Median with min and max of a set of values (one per round or per run)."""

    n: int
    median: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"n": self.n, "median": self.median, "min": self.low, "max": self.high}


def spread(values: list[float]) -> Spread | None:
    """Median (mean of the middle two for an even count), min and max; None when empty."""
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    mid = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return Spread(n, mid, v[0], v[-1])
