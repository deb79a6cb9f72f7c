"""Latency as canary analysis: is a device's tail over budget evidence about the candidate, or about the host?

A p99 budget says at most TAIL_SHARE (1%) of answers may take longer than the budget. On a loaded host
the base release misses it too now and then (a preempted process waits many ms), so a candidate is judged
the way Kayenta and Argo Rollouts judge a canary: against the base on the same device class over the same
stretch of time (the snapshot the controller decides on: the rollout so far), and only on evidence
that holds statistically.

* The allowed tail: p0 = max(1%, max_ratio_to_base * the base's over-budget share on that class
  in the snapshot). With no base evidence there (fewer than `min_samples` answers), p0 = 1%: the budget
  alone.
* Abort (irreversible, so it needs proof): a device fails when a one-sided exact binomial test rejects
  "its share of answers over budget is at most p0" at `significance`: k answers certainly over budget
  (their whole bucket lies above it) in n. One preempted answer in 40 is not evidence (P ~ 0.33 at
  p0 = 1%); a release slower than the budget on every answer is, after a handful of answers.
* Advance (cheap to delay, so it holds on the point estimate): a class is unmet while its p99 is over
  budget and its share of answers possibly over budget is above p0 (base share counted conservatively
  the other way: certainly over).

    >>> allowed = allowed_tail(base_histogram, budget_ms=50, analysis=LatencyAnalysis(), min_samples=50)
    >>> verdict = judge_device(device_histogram, budget_ms=50, allowed=allowed, analysis=LatencyAnalysis())
    >>> verdict.failed, verdict.p_value
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from edgeship.records.histogram import ExpHistogram as Histogram
from edgeship.fleet.policy import LatencyAnalysis

TAIL_SHARE = 0.01  # a p99 budget: at most 1% of answers over it


class TailVerdict(BaseModel):
    """One device (or class) on one version: its over-budget answers against the allowed share."""

    model_config = ConfigDict(frozen=True)
    answers: int
    over_budget: int
    allowed_share: float
    p_value: float
    failed: bool


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact to double precision (summed in log space).

    Past the mean the terms fall at least geometrically, so the sum stops once they no longer change it: a
    device with a day of answers (n in the hundreds of thousands) costs a few hundred terms, not n."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    head = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
    if k <= n * p:  # at or below the mean: sum every term (rare here: the caller asks only above allowed * n)
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
                 for i in range(k, n + 1)]
        top = max(terms)
        return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
    total, term, ratio = 1.0, 1.0, p / (1.0 - p)
    for i in range(k, n):
        term *= (n - i) / (i + 1) * ratio      # term(i + 1) / term(k)
        total += term
        if term < total * 1e-17:
            break
    return min(1.0, math.exp(head) * total)


def allowed_tail(base: Histogram | None, budget_ms: float, analysis: LatencyAnalysis, min_samples: int,
                 certain: bool = False) -> float:
    """The over-budget share the candidate may have on a class: the budget's, or a multiple of the base's there.

    `certain=False` counts the base's answers possibly over budget (the larger share: in the candidate's favour,
    for aborts); `certain=True` those certainly over (the smaller: against the candidate, for advancing)."""
    if base is None or base.total < min_samples:
        return TAIL_SHARE
    over = base.count_above(budget_ms) if certain else base.count_possibly_above(budget_ms)
    return min(1.0, max(TAIL_SHARE, analysis.max_ratio_to_base * over / base.total))


def judge_device(latency: Histogram, budget_ms: float, allowed: float, analysis: LatencyAnalysis) -> TailVerdict:
    """Does this device's tail show, at `analysis.significance`, more answers over budget than `allowed`?"""
    n, k = latency.total, latency.count_above(budget_ms)
    p_value = binomial_sf(k, n, allowed) if k > allowed * n else 1.0
    return TailVerdict(answers=n, over_budget=k, allowed_share=round(allowed, 6), p_value=p_value,
                       failed=p_value <= analysis.significance)


def class_over_budget(latency: Histogram, budget_ms: float, allowed: float) -> bool:
    """The success side: the class's p99 is over budget and its possibly-over share exceeds what is allowed."""
    p99 = latency.quantile(1.0 - TAIL_SHARE)
    if p99 is None or p99 <= budget_ms:
        return False
    return latency.count_possibly_above(budget_ms) > allowed * latency.total
