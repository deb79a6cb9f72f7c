"""Agreement of a candidate with the model it replaces, read from the rollups, judged with Wilson bounds.

Two sources say how often the candidate gives the base's answer: a shadow cohort (the candidate runs beside the
base, `ShadowSummary`) and, on every rollout, the devices serving the candidate, which run the model it replaced on
a sampled share of inputs (`compared@<base>.*` sums, edgeship.fleet.rollup_compared). A ratio of a handful of
answers is no evidence either way, so a device is judged on a one-sided Wilson score bound of its agreement:

* Abort (irreversible): a device fails `disagreement` when even the upper bound of its agreement is below
  `policy.agreement.abort_below` at `significance` (at the default 0.5: 6 disagreements of 6 are enough; 4
  agreements of 10 are not).
  It counts as executed once it has `min_samples_per_device` comparisons, or earlier when it already failed.
* Advance (cheap to delay): the candidate's comparisons over all its devices must number `min_compared` and their
  agreement reach `min_agreement`.

    >>> compared = comparison_of(snapshot.version("8"), base_version="7")
    >>> compared.samples, compared.agreement, compared.by_device["dev-3"]
    >>> failed_on_agreement(3, 40, abort_below=0.8, significance=0.01)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING

from edgeship.fleet.rollup_compared import sum_name

if TYPE_CHECKING:
    from edgeship.fleet.aggregate import VersionStats


def wilson_bounds(agreements: int, samples: int, significance: float) -> tuple[float, float]:
    """One-sided Wilson score bounds (lower, upper) of a proportion, each at confidence 1 - significance."""
    if samples <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - significance)
    share, z2 = agreements / samples, z * z
    centre = (share + z2 / (2 * samples)) / (1 + z2 / samples)
    half = z * math.sqrt(share * (1 - share) / samples + z2 / (4 * samples * samples)) / (1 + z2 / samples)
    return max(0.0, centre - half), min(1.0, centre + half)


def failed_on_agreement(agreements: int, samples: int, abort_below: float, significance: float) -> bool:
    """Is this agreement significantly below `abort_below` (the Wilson upper bound under it)?"""
    return samples > 0 and wilson_bounds(agreements, samples, significance)[1] < abort_below


@dataclass(frozen=True)
class Comparison:
    """A version's answers compared with another's (`compared_with`) on the devices serving it."""

    compared_with: str | None = None
    samples: int = 0
    agreements: int = 0
    confidence_diff: float | None = None       # mean |top-1 confidence difference|
    p99_ms: float | None = None                 # the compared model's latency
    by_device: dict[str, tuple[int, int]] = field(default_factory=dict)   # device -> (agreements, samples)

    @property
    def agreement(self) -> float | None:
        return self.agreements / self.samples if self.samples else None

    @property
    def devices(self) -> int:
        return len(self.by_device)


def comparison_of(stats: VersionStats | None, base_version: str | None) -> Comparison:
    """The comparisons of `stats`' version with `base_version`, from its class and device rows."""
    if stats is None or not base_version:
        return Comparison(compared_with=base_version)
    samples, agreements = sum_name(base_version, "samples"), sum_name(base_version, "agreements")
    total = int(stats.sums.get(samples))
    latency = stats.sums.histograms.get(sum_name(base_version, "latency"))
    return Comparison(
        compared_with=base_version, samples=total, agreements=int(stats.sums.get(agreements)),
        confidence_diff=stats.sums.get(sum_name(base_version, "confidence_diff_sum")) / total if total else None,
        p99_ms=latency.quantile(0.99) if latency is not None and latency.total else None,
        by_device={d: (int(s.get(agreements)), int(s.get(samples))) for d, s in sorted(stats.device_sums.items())
                   if s.get(samples)})
