"""Mergeable histograms with bounded relative error: OpenTelemetry's base-2 exponential bucket mapping.

At scale s, base = 2 ** (2 ** -s) and bucket i holds the values in (base**i, base**(i+1)]; scale 5 makes
buckets 2.2% wide. Counts are a numpy array keyed by (scale, offset): merging two histograms adds counts
per index (coarsening the finer one first when scales differ), so a fleet's histogram is the sum of its
devices' windows. A quantile is read from the bucket holding its rank, interpolated inside it and kept
within 2% of every value the bucket can hold (scale >= 5), where the old fixed buckets (1.2x apart, read at
the upper edge) were off by up to 20%.

Counts of histograms from older devices (the fixed buckets of `LEGACY_EDGES_MS`) are kept apart in
`legacy` and honoured with their own (wider) bounds, so an old record reads as it always did.

    >>> histogram = ExpHistogram.of([2.0, 2.1, 45.0])
    >>> histogram.quantile(0.5), histogram.count_above(40.0), histogram.merged(other).total
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

DEFAULT_SCALE = 5
MAX_RELATIVE_ERROR = 0.02   # what a quantile may be off by at scale >= 5 (see `_estimate`)
# The fixed latency buckets of schema 1 records: upper edges in ms, 1.2x apart, and one overflow bucket.
LEGACY_EDGES_MS: tuple[float, ...] = tuple(round(0.01 * 1.2 ** i, 6) for i in range(86))
_LEGACY_UPPER = np.array(LEGACY_EDGES_MS + (math.inf,))
_LEGACY_LOWER = np.concatenate([[0.0], _LEGACY_UPPER[:-1]])


def bucket_index(value: float, scale: int = DEFAULT_SCALE) -> int:
    """The bucket holding `value` (> 0): i with base**i < value <= base**(i+1)."""
    mantissa, exponent = math.frexp(value)          # value = mantissa * 2**exponent, mantissa in [0.5, 1)
    if mantissa == 0.5:                              # an exact power of two is the upper bound of its bucket
        return ((exponent - 1) << scale) - 1
    return math.ceil(math.log2(value) * (1 << scale)) - 1


def bucket_indices(values: np.ndarray, scale: int = DEFAULT_SCALE) -> np.ndarray:
    """`bucket_index` of many positive values at once."""
    return (np.ceil(np.log2(values) * (1 << scale)) - 1).astype(np.int64)


def lower_bound(index: int | np.ndarray, scale: int) -> float | np.ndarray:
    return np.exp2(np.asarray(index, dtype=np.float64) / (1 << scale))


class ExpHistogram:
    """Counts per exponential bucket: `counts[k]` is bucket `offset + k` at `scale`; `zero` counts values <= 0."""

    __slots__ = ("scale", "offset", "counts", "zero", "legacy")

    def __init__(self, scale: int = DEFAULT_SCALE, offset: int = 0, counts: np.ndarray | None = None,
                 zero: int = 0, legacy: Mapping[int, int] | None = None):
        self.scale, self.offset, self.zero = int(scale), int(offset), int(zero)
        self.counts = np.zeros(0, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        self.legacy = {int(k): int(v) for k, v in (legacy or {}).items() if v}

    @classmethod
    def of(cls, values: Iterable[float], scale: int = DEFAULT_SCALE) -> ExpHistogram:
        """The histogram of some values."""
        values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
        positive = values[values > 0]
        histogram = cls(scale, zero=int(np.count_nonzero(values <= 0)))
        if len(positive):
            indices = bucket_indices(positive, scale)
            histogram.offset = int(indices.min())
            histogram.counts = np.bincount(indices - histogram.offset).astype(np.int64)
        return histogram

    @classmethod
    def from_counts(cls, counts: Mapping[int, int], scale: int = DEFAULT_SCALE, zero: int = 0) -> ExpHistogram:
        """From a sparse map bucket index -> count (what a device accumulates during a window)."""
        if not counts:
            return cls(scale, zero=zero)
        low, high = min(counts), max(counts)
        dense = np.zeros(high - low + 1, dtype=np.int64)
        for index, count in counts.items():
            dense[index - low] += count
        return cls(scale, low, dense, zero)

    # --- merging ----------------------------------------------------------------------

    def downscaled(self, scale: int) -> ExpHistogram:
        """The same counts at a coarser `scale` (each bucket folds into bucket index >> (self.scale - scale))."""
        if scale >= self.scale or not len(self.counts):
            return ExpHistogram(min(scale, self.scale), self.offset, self.counts.copy(), self.zero, self.legacy)
        shift = self.scale - scale
        indices = (np.arange(len(self.counts)) + self.offset) >> shift
        low = int(indices[0])
        return ExpHistogram(scale, low, np.bincount(indices - low, weights=self.counts).astype(np.int64), self.zero,
                            self.legacy)

    def merged(self, other: ExpHistogram) -> ExpHistogram:
        """A new histogram holding both (at the coarser of the two scales)."""
        result = self.copy()
        result.add(other)
        return result

    def add(self, other: ExpHistogram) -> None:
        """Add `other`'s counts to this one, in place."""
        if other.scale < self.scale and len(self.counts):
            coarse = self.downscaled(other.scale)
            self.scale, self.offset, self.counts = coarse.scale, coarse.offset, coarse.counts
        elif not len(self.counts) and len(other.counts):
            self.scale = other.scale
        if other.scale > self.scale:
            other = other.downscaled(self.scale)
        self.zero += other.zero
        for index, count in other.legacy.items():
            self.legacy[index] = self.legacy.get(index, 0) + count
        if not len(other.counts):
            return
        if not len(self.counts):
            self.offset, self.counts = other.offset, other.counts.copy()
            return
        low = min(self.offset, other.offset)
        high = max(self.offset + len(self.counts), other.offset + len(other.counts))
        if low != self.offset or high != self.offset + len(self.counts):
            grown = np.zeros(high - low, dtype=np.int64)
            grown[self.offset - low:self.offset - low + len(self.counts)] = self.counts
            self.offset, self.counts = low, grown
        start = other.offset - self.offset
        self.counts[start:start + len(other.counts)] += other.counts

    def copy(self) -> ExpHistogram:
        return ExpHistogram(self.scale, self.offset, self.counts.copy(), self.zero, self.legacy)

    # --- reading ----------------------------------------------------------------------

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zero + sum(self.legacy.values())

    def _intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower, upper, count) of every non-empty bucket, in order of upper bound (the zero bucket first)."""
        nonzero = np.flatnonzero(self.counts)
        lower = lower_bound(nonzero + self.offset, self.scale)
        upper = lower_bound(nonzero + self.offset + 1, self.scale)
        counts = self.counts[nonzero]
        if self.zero:
            lower, upper, counts = np.r_[0.0, lower], np.r_[0.0, upper], np.r_[self.zero, counts]
        if self.legacy:
            index = np.array(sorted(self.legacy))
            lower = np.r_[lower, _LEGACY_LOWER[index]]
            upper = np.r_[upper, _LEGACY_UPPER[index]]
            counts = np.r_[counts, [self.legacy[i] for i in index]]
            order = np.lexsort((lower, upper))
            lower, upper, counts = lower[order], upper[order], counts[order]
        return lower, upper, counts

    def quantile(self, q: float) -> float | None:
        """The q-quantile (the ceil(q * total)-th smallest value), None when empty.

        Interpolated inside the bucket holding that rank: its values are taken as spread evenly (in log
        space) over the bucket, and the estimate is kept within MAX_RELATIVE_ERROR of both bounds, so it is
        within 2% of the true value wherever in the bucket that lies (an old record's bucket: within it)."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        lower, upper, counts = self._intervals()
        cumulative = np.cumsum(counts)
        at = int(np.searchsorted(cumulative, rank))
        if at >= len(counts):
            at = len(counts) - 1
        within = rank - (int(cumulative[at - 1]) if at else 0)
        return _estimate(float(lower[at]), float(upper[at]), within, int(counts[at]))

    def count_above(self, limit: float) -> int:
        """Values certainly above `limit` (their whole bucket lies above it)."""
        lower, _, counts = self._intervals()
        return int(counts[lower >= limit].sum())

    def count_possibly_above(self, limit: float) -> int:
        """Values perhaps above `limit` (their bucket reaches above it)."""
        _, upper, counts = self._intervals()
        return int(counts[upper > limit].sum())

    def mean(self) -> float | None:
        """An estimate of the mean (each bucket at its middle)."""
        lower, upper, counts = self._intervals()
        if not counts.sum():
            return None
        middle = np.where(np.isinf(upper), lower, (lower + upper) / 2)
        return float((middle * counts).sum() / counts.sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpHistogram):
            return NotImplemented
        a, b = self.trimmed(), other.trimmed()
        return (a.scale, a.offset, a.zero, a.legacy) == (b.scale, b.offset, b.zero, b.legacy) and \
            np.array_equal(a.counts, b.counts)

    def trimmed(self) -> ExpHistogram:
        """Without leading and trailing empty buckets."""
        nonzero = np.flatnonzero(self.counts)
        if not len(nonzero):
            return ExpHistogram(self.scale, 0, None, self.zero, self.legacy)
        return ExpHistogram(self.scale, self.offset + int(nonzero[0]), self.counts[nonzero[0]:nonzero[-1] + 1],
                            self.zero, self.legacy)

    def __repr__(self) -> str:
        return f"ExpHistogram(scale={self.scale}, total={self.total}, p50={self.quantile(0.5)})"

    # --- storage ----------------------------------------------------------------------

    def to_json(self) -> list:
        """A compact JSON form: [scale, offset, counts, zero, legacy]."""
        trimmed = self.trimmed()
        return [trimmed.scale, trimmed.offset, trimmed.counts.tolist(), trimmed.zero,
                {str(k): v for k, v in trimmed.legacy.items()}]

    @classmethod
    def from_json(cls, data: list) -> ExpHistogram:
        scale, offset, counts, zero, legacy = data
        return cls(scale, offset, np.asarray(counts, dtype=np.int64), zero, {int(k): v for k, v in legacy.items()})


def _estimate(lower: float, upper: float, within: int, count: int) -> float:
    if math.isinf(upper):               # an old record's overflow bucket: all we know is its lower edge
        return lower
    if lower <= 0.0:
        return upper * (within - 0.5) / count if upper > 0 else 0.0
    estimate = lower * (upper / lower) ** ((within - 0.5) / count)
    # Any value of the bucket is within 2% of an estimate in [upper / 1.02, lower * 1.02]: a non-empty range
    # when the bucket is narrower than 1.02 ** 2 (scale >= 5). A wider (old) bucket is left as interpolated.
    low, high = upper / (1 + MAX_RELATIVE_ERROR), lower * (1 + MAX_RELATIVE_ERROR)
    return min(max(estimate, low), high) if low <= high else estimate


def merge_all(histograms: Iterable[ExpHistogram]) -> ExpHistogram:
    """The sum of many histograms."""
    return merge_many(list(histograms))


def merge_many(histograms: list[ExpHistogram]) -> ExpHistogram:
    """The sum of many histograms in one array: each adds a slice, no intermediate histogram per merge.

    (A single histogram is returned as it is: callers treat histograms they merge as values, never change them.)"""
    if len(histograms) == 1:
        return histograms[0]
    filled = [h for h in histograms if len(h.counts)]
    scale = min((h.scale for h in filled), default=DEFAULT_SCALE)
    filled = [h if h.scale == scale else h.downscaled(scale) for h in filled]
    total = ExpHistogram(scale)
    for histogram in histograms:
        total.zero += histogram.zero
        for index, count in histogram.legacy.items():
            total.legacy[index] = total.legacy.get(index, 0) + count
    if filled:
        low = min(h.offset for h in filled)
        counts = np.zeros(max(h.offset + len(h.counts) for h in filled) - low, dtype=np.int64)
        for histogram in filled:
            start = histogram.offset - low
            counts[start:start + len(histogram.counts)] += histogram.counts
        total.offset, total.counts = low, counts
    return total


def legacy_bucket(latency_ms: float) -> int:
    """The fixed bucket of a schema 1 record that `latency_ms` falls in (the last is the overflow bucket)."""
    return int(np.searchsorted(LEGACY_EDGES_MS, latency_ms, side="left"))
