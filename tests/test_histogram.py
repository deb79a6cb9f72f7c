"""Exponential histograms (edgeship.records.histogram): quantiles within 2% of the exact ones, merging equal to
the histogram of all values, scales folding into each other, old fixed-bucket histograms read beside new ones."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.records.histogram import (LEGACY_EDGES_MS, ExpHistogram, bucket_index, bucket_indices, legacy_bucket,
                                        lower_bound, merge_all)
from edgeship.records.telemetry import Histogram


def samples(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    return {"lognormal": lambda: rng.lognormal(1.0, 0.6, n), "bimodal": lambda: np.r_[rng.normal(3, 0.2, n - n // 20),
                                                                                       rng.normal(45, 3, n // 20)],
            "spike": lambda: np.full(n, 52.0), "uniform": lambda: rng.uniform(0.05, 500, n)}[kind]()


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "spike", "uniform"])
def test_quantiles_of_merged_windows_are_within_two_percent_of_the_exact_ones(kind):
    rng = np.random.default_rng(7)
    values = np.abs(samples(kind, rng, 5000)) + 1e-3
    windows = np.array_split(values, 37)                 # 37 devices' windows, merged as the rollups merge them
    merged = merge_all(ExpHistogram.of(w) for w in windows)
    assert merged == ExpHistogram.of(values) and merged.total == len(values)
    for q in (0.5, 0.95, 0.99):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert abs(merged.quantile(q) - exact) / exact <= 0.02, (q, merged.quantile(q), exact)


def test_a_budget_is_judged_on_the_true_side_of_a_two_percent_bucket():
    # The old buckets read a true p99 of 45 ms as 52.7 ms (over a 50 ms budget); one at 52 ms could never show over.
    under, over = ExpHistogram.of([2.0] * 980 + [45.0] * 20), ExpHistogram.of([2.0] * 980 + [52.0] * 20)
    assert under.quantile(0.99) == pytest.approx(45.0, rel=0.02) and under.quantile(0.99) < 50
    assert over.quantile(0.99) == pytest.approx(52.0, rel=0.02) and over.quantile(0.99) > 50
    assert under.count_possibly_above(50.0) == 0 and over.count_above(50.0) == 20


def test_bucket_mapping_follows_opentelemetry_and_scales_fold():
    assert bucket_index(1.0) == -1 and bucket_index(2.0) == 31 and bucket_index(2.0001) == 32   # (base^i, base^(i+1)]
    values = np.random.default_rng(1).lognormal(0, 2, 2000)
    indices = bucket_indices(values)
    assert np.array_equal(indices, [bucket_index(float(v)) for v in values])
    assert np.all(lower_bound(indices, 5) < values) and np.all(values <= lower_bound(indices + 1, 5))
    fine = ExpHistogram.of(values, scale=6)
    assert fine.downscaled(5) == ExpHistogram.of(values, scale=5)
    assert fine.merged(ExpHistogram.of(values, scale=5)).scale == 5                  # merged at the coarser scale
    assert ExpHistogram.from_json(fine.to_json()) == fine


def test_wire_histogram_round_trip_and_old_fixed_buckets_merge_with_new_ones():
    new = Histogram.of([1.0, 2.0, 3.0, 0.0])
    assert Histogram.model_validate_json(new.model_dump_json()) == new and new.zero_count == 1 and new.total == 4
    old = Histogram(counts={legacy_bucket(5.0): 3, len(LEGACY_EDGES_MS): 1})        # schema 1, one overflow answer
    both = merge_all([new.sketch(), old.sketch()])
    assert both.total == 8 and both.count_above(4.0) == 4 and both.count_possibly_above(4.0) == 4
    assert both.quantile(1.0) == pytest.approx(LEGACY_EDGES_MS[-1])   # the overflow bucket: its lower edge, no more
