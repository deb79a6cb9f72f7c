"""Cohort against cohort: is the candidate's predicted-class mix (or confidence distribution) the base's?

Devices join the candidate by a hash of their id, so over the same stretch of time the candidate's and the base's
cohorts see the same inputs; a candidate that collapses on field inputs shows as a different mix, even where no
answer of it is compared with the base's. Counts come from the rollups (`classes`, and `confidence` in 10 bins on
[0, 1]) of each version since the rollout began.

Which test, as Evidently's default drift algorithm chooses it (NannyML offers the same two for categories):

* Up to `max_chi2_answers` answers in the smaller cohort: Pearson's chi-squared test of homogeneity on the
  2 x k table, with the usual expected-count guard (categories expected fewer than 5 times are pooled into one;
  the approximation is poor below that). A p-value is the right question at these sizes: is there evidence at all?
* Above it: the Jensen-Shannon distance of the two mixes (natural logarithm, as scipy and Evidently compute it;
  0 equal, 0.83 disjoint) against `max_js_distance`. At tens of thousands of answers chi-squared rejects any
  difference, however small; what matters there is how large the difference is, which a distance says.

Fewer than `min_answers` in either cohort: no verdict (`enough` is False), and the stage waits. The controller holds
a candidate for a difference only where its mix is further from the release's reference than the base's
(edgeship.fleet.controller): after a field shift it is the base that moved.

The confidence distributions are compared only when `policy.confidence` is on: two models answer the same inputs
with different confidences by design (another training run is calibrated otherwise: the fleet simulator's two good
releases, 96% in agreement, are 0.13 apart in Jensen-Shannon distance and chi-squared p = 3e-7 on the same 597
test images), so by default a shift in confidence is
judged per version against its own release's reference (drift) and as estimated accuracy (edgeship.fleet.estimate).

    >>> verdict = compare_cohorts("classes", candidate_counts, base_counts, policy.cohort)
    >>> verdict.test, verdict.differs, verdict.p_value, verdict.distance
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

MIN_EXPECTED = 5.0


class CohortVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str                      # "classes" | "confidence"
    test: str                      # "chi2" | "jensen-shannon" | "none"
    candidate_answers: int
    base_answers: int
    enough: bool
    differs: bool
    statistic: float | None = None     # chi-squared statistic
    dof: int | None = None
    p_value: float | None = None
    distance: float | None = None      # Jensen-Shannon distance


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-squared(dof): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    if x <= 0:
        return 1.0
    a, x = dof / 2.0, x / 2.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # the series of P(a, x) converges fast here
        term = total = 1.0 / a
        n = a
        while term > total * 1e-15:
            n += 1.0
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300  # else the continued fraction of Q(a, x) (modified Lentz)
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def chi2_homogeneity(candidate: np.ndarray, base: np.ndarray) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of the 2 x k table, categories expected < 5 times pooled into one."""
    table = np.vstack([candidate, base]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    rows, total = table.sum(axis=1, keepdims=True), table.sum()
    expected_min = (rows.min() * table.sum(axis=0)) / total      # the smaller row's expectations bound the table's
    small = expected_min < MIN_EXPECTED
    if small.any():
        pooled = table[:, small].sum(axis=1, keepdims=True)
        table = np.hstack([table[:, ~small], pooled])
        if rows.min() * pooled.sum() / total < MIN_EXPECTED and table.shape[1] > 2:  # the pool is still too small:
            order = np.argsort(table[:, :-1].sum(axis=0))                              # join the smallest category
            table = np.hstack([np.delete(table[:, :-1], order[0], axis=1),
                               table[:, -1:] + table[:, order[0]:order[0] + 1]])
    if table.shape[1] < 2:
        return 0.0, 0, 1.0   # everything in one category in both: nothing differs
    expected = rows @ table.sum(axis=0, keepdims=True) / total
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    return statistic, dof, chi2_sf(statistic, dof)


def jensen_shannon_distance(candidate: np.ndarray, base: np.ndarray) -> float:
    """sqrt of the Jensen-Shannon divergence of the two mixes (natural logarithm)."""
    p = np.asarray(candidate, np.float64) / max(float(np.sum(candidate)), 1e-12)
    q = np.asarray(base, np.float64) / max(float(np.sum(base)), 1e-12)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / m[mask])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def compare_cohorts(name: str, candidate, base, policy) -> CohortVerdict:
    """The candidate cohort's counts against the base cohort's (`policy`: edgeship.fleet.policy.CohortPolicy)."""
    candidate, base = np.asarray(candidate, np.int64), np.asarray(base, np.int64)
    width = max(len(candidate), len(base))
    candidate, base = np.pad(candidate, (0, width - len(candidate))), np.pad(base, (0, width - len(base)))
    n_candidate, n_base = int(candidate.sum()), int(base.sum())
    common = {"name": name, "candidate_answers": n_candidate, "base_answers": n_base}
    if min(n_candidate, n_base) < policy.min_answers:
        return CohortVerdict(**common, test="none", enough=False, differs=False)
    if min(n_candidate, n_base) <= policy.max_chi2_answers:
        statistic, dof, p_value = chi2_homogeneity(candidate, base)
        return CohortVerdict(**common, test="chi2", enough=True, differs=p_value < policy.significance,
                             statistic=round(statistic, 4), dof=dof, p_value=p_value)
    distance = jensen_shannon_distance(candidate, base)
    return CohortVerdict(**common, test="jensen-shannon", enough=True, differs=distance > policy.max_js_distance,
                         distance=round(distance, 5))


def cohort_verdicts(candidate_sums, base_sums, policy) -> list[CohortVerdict]:
    """Class mix (and, with `policy.confidence`, confidence distribution) of the candidate's rollup sums against the
    base's."""
    verdicts = []
    for name in ("classes", "confidence") if policy.confidence else ("classes",):
        mine, theirs = candidate_sums.vectors.get(name), base_sums.vectors.get(name)
        verdicts.append(compare_cohorts(name, mine if mine is not None else [], theirs if theirs is not None else [],
                                        policy))
    return verdicts
