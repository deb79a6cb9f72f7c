"""Every rollout compares answers: the candidate against the model it replaced (Wilson-bounded, per device), its
cohort's class and confidence mix against the base cohort's (chi-squared or Jensen-Shannon by sample size), and an
accuracy estimate without labels (CBPE). Recorded fleet states, stored and read back from the rollups as the
controller reads them; the statistics against values computed with scipy."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from edgeship.fleet.agreement import comparison_of, failed_on_agreement, wilson_bounds
from edgeship.fleet.cohort import chi2_homogeneity, chi2_sf, compare_cohorts, jensen_shannon_distance
from edgeship.fleet.controller import RolloutStatus, decide
from edgeship.fleet.estimate import confidence_accuracy, estimated_accuracy
from edgeship.fleet.policy import AgreementPolicy, ChannelPolicy, CohortPolicy
from edgeship.fleet.rollup import Rollups
from edgeship.fleet.store import FleetStore
from edgeship.records.telemetry import DriftReference

from fleet_records import T0, record

POLICY = ChannelPolicy.model_validate({
    "stages": [0.25, 0.5, 1.0], "min_reporting_devices": 4, "soak_s": 0,
    "abort_criteria": [{"failure_type": t, "min_executed_devices": 3, "threshold_percentage": 40}
                       for t in ("install", "probation", "latency", "disagreement")]})
STATUS = RolloutStatus(channel="stable", target="onnx-int8", base_version="7", candidate_version="8", fraction=0.25,
                       stage_started_at=T0, latency_budget_ms=20.0)
NOW = T0 + timedelta(seconds=700)
BASE = [record(f"base-{i}", "7") for i in range(12)]            # 200 answers each, ten classes alike


def decide_on(records, status=STATUS, policy=POLICY, reference=None):
    store = FleetStore("sqlite://")
    try:
        store.add_batch(records)
        snapshot = store.snapshot("stable", "onnx-int8", since=T0, reference=reference, versions=["7", "8"])
    finally:
        store.close()
    return decide(snapshot, status, policy, NOW), snapshot


def candidate(n, agreements, samples, **kwargs):
    return [record(f"cand-{i}", "8", compared=("7", agreements, samples),
                   events=[("installed", "8", None), ("confirmed", "8", None)], **kwargs) for i in range(n)]


# --- the comparison with the model it replaced -----------------------------------------------------------------

def test_wilson_bounds_are_the_score_interval_and_narrow_with_answers():
    z2 = 2.326348 ** 2   # one-sided 99%
    low, high = wilson_bounds(0, 3, 0.01)
    assert low == 0.0 and high == pytest.approx(z2 / (3 + z2), abs=1e-5)          # 0.643: 3 of 3 wrong fails
    assert failed_on_agreement(0, 3, abort_below=0.8, significance=0.01)
    assert not failed_on_agreement(9, 10, abort_below=0.8, significance=0.01)     # 90% of 10: no evidence
    assert not failed_on_agreement(1, 1, abort_below=0.8, significance=0.01)
    low_100, high_100 = wilson_bounds(96, 100, 0.01)
    low_10k, high_10k = wilson_bounds(9600, 10_000, 0.01)
    assert low_100 < low_10k < 0.96 < high_10k < high_100 and high_100 - low_100 > 5 * (high_10k - low_10k)
    # a ratio of 7 in 10 fails nothing; the same ratio over 200 answers is significantly below 0.8
    assert not failed_on_agreement(7, 10, 0.8, 0.01) and failed_on_agreement(140, 200, 0.8, 0.01)


def test_comparisons_roll_up_per_replaced_version_and_device():
    records = candidate(3, 40, 50) + [record("older", "8", compared=("6", 0, 50))]   # compared with another version
    stats = Rollups().add_records(records)
    from edgeship.fleet.aggregate import snapshot_of

    version = snapshot_of(stats.classes.items(), stats.devices.items()).versions["8"]
    compared = comparison_of(version, "7")
    assert (compared.samples, compared.agreements, compared.devices) == (150, 120, 3)
    assert compared.by_device["cand-0"] == (40, 50) and "older" not in compared.by_device
    assert comparison_of(version, "6").samples == 50 and comparison_of(version, "5").samples == 0


def test_a_silent_failure_is_aborted_on_disagreement_without_a_shadow_stage():
    decision, _ = decide_on(BASE + candidate(4, 2, 60))     # fast, installed, confirmed: answers rotated
    assert decision.action == "abort" and decision.fraction_after == 0.0
    assert decision.reasons == ["abort: disagreement failures on 4/4 devices (100% >= 40%)"]
    evidence = decision.evidence["abort_criteria"]["disagreement"]
    assert evidence["disagreeing"]["cand-0"] == {"agreements": 2, "samples": 60}
    assert decision.evidence["compared"]["agreement"] == pytest.approx(2 / 60)


def test_a_device_fails_before_its_minimum_of_comparisons_only_when_the_bound_proves_it():
    early = candidate(3, 0, 8)                  # 0 of 8 agree: upper bound 0.40 < 0.5, under 50 comparisons
    decision, _ = decide_on(BASE + early)
    assert decision.action == "abort" and "disagreement failures on 3/3 devices" in decision.reasons[0]
    unsure = candidate(3, 1, 4)                 # 1 of 4: no evidence yet, and too few comparisons to count
    decision, _ = decide_on(BASE + unsure)
    assert decision.action == "hold" and decision.evidence["abort_criteria"]["disagreement"]["executed"] == 0


def test_a_good_candidate_agreeing_96_percent_advances():
    decision, _ = decide_on(BASE + candidate(4, 96, 100))
    assert decision.action == "advance" and decision.fraction_after == 0.5, decision.reasons
    assert decision.evidence["abort_criteria"]["disagreement"] == {
        "executed": 4, "failed": [], "failed_devices": 0, "failure_percentage": 0.0}


def test_a_candidate_compared_on_too_few_answers_or_agreeing_too_little_holds():
    decision, _ = decide_on(BASE + candidate(4, 10, 10))
    assert decision.action == "hold" and decision.reasons == ["hold: compared with v7 on 40/200 answers"]
    decision, _ = decide_on(BASE + candidate(4, 45, 100))   # not proof of a failure, but below min_agreement
    assert decision.action == "hold" and decision.reasons == ["hold: agreement with v7 0.450 < 0.5"]
    like_the_base = POLICY.model_copy(update={"agreement": AgreementPolicy(min_agreement=0.95)})  # a re-quantization
    decision, _ = decide_on(BASE + candidate(4, 90, 100), policy=like_the_base)
    assert decision.action == "hold" and decision.reasons == ["hold: agreement with v7 0.900 < 0.95"]
    first = STATUS.model_copy(update={"base_version": None})          # a first release replaces nothing
    decision, _ = decide_on(candidate(4, 0, 0), status=first)
    assert decision.action == "advance", decision.reasons


# --- cohort against cohort ---------------------------------------------------------------------------------------

def test_chi_squared_matches_scipy():
    # scipy.stats.chi2.sf and chi2_contingency(correction=False) on the same numbers (scipy 1.17)
    for x, dof, expected in [(0.5, 1, 0.47950012218695337), (3.0, 2, 0.22313016014842982),
                             (20.0, 9, 0.017912404529843298), (100.0, 9, 1.5735176303753876e-17),
                             (5.0, 20, 0.9997226479053791)]:
        assert chi2_sf(x, dof) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    statistic, dof, p_value = chi2_homogeneity(np.array([30, 40, 50, 20, 10]), np.array([35, 30, 60, 25, 15]))
    assert (round(statistic, 6), dof) == (3.571647, 4) and p_value == pytest.approx(0.46706827625219705, rel=1e-9)
    assert jensen_shannon_distance(np.array([30, 40, 50, 20, 10]), np.array([35, 30, 60, 25, 15])) == \
        pytest.approx(0.07538212274602019, rel=1e-9)


def test_categories_expected_fewer_than_five_times_are_pooled():
    _, dof, _ = chi2_homogeneity(np.array([100, 100, 3, 4, 0]), np.array([100, 100, 4, 3, 0]))
    assert dof == 2          # the two rare classes (3.5 expected each) go into one; the never-seen one drops out
    _, dof, _ = chi2_homogeneity(np.array([100, 100, 1, 2, 0]), np.array([100, 100, 2, 1, 0]))
    assert dof == 1          # their pool is still expected under 5 times: it joins the smallest other category


def test_the_test_is_chosen_by_sample_size():
    policy = CohortPolicy()
    rng = np.random.default_rng(0)
    uniform = np.full(10, 0.1)
    small_same = compare_cohorts("classes", rng.multinomial(400, uniform), rng.multinomial(900, uniform), policy)
    assert small_same.test == "chi2" and small_same.enough and not small_same.differs
    collapsed = compare_cohorts("classes", [300, 20, 10, 0, 0, 0, 0, 0, 0, 0], rng.multinomial(900, uniform), policy)
    assert collapsed.test == "chi2" and collapsed.differs and collapsed.p_value < 1e-10
    rotated = compare_cohorts("classes", np.roll(rng.multinomial(400, uniform), 1), rng.multinomial(900, uniform),
                              policy)
    assert not rotated.differs   # a rotated model keeps the mix: only the comparison of answers catches it
    # 100,000 answers a side, 1.5 points moved between two classes: chi-squared calls that a difference, the
    # distance says how little it is
    slightly = np.full(10, 10_000)
    slightly[0], slightly[1] = 11_500, 8_500
    large = compare_cohorts("classes", slightly, np.full(10, 10_000), policy)
    assert chi2_homogeneity(slightly, np.full(10, 10_000))[2] < 1e-10
    assert large.test == "jensen-shannon" and large.distance < 0.05 and not large.differs
    gone = compare_cohorts("classes", [50_000, 50_000] + [0] * 8, np.full(10, 10_000), policy)
    assert gone.test == "jensen-shannon" and gone.differs
    few = compare_cohorts("classes", [50, 0, 0], [1000, 1000, 1000], policy)
    assert not few.enough and few.test == "none" and not few.differs


def test_a_collapsed_cohort_holds_the_stage_and_aborts_when_asked():
    collapsed = candidate(4, 96, 100, classes=[200] + [0] * 9)
    decision, _ = decide_on(BASE + collapsed)
    assert decision.action == "hold" and len(decision.reasons) == 1, decision.reasons
    assert decision.reasons[0].startswith("hold: the candidate cohort's classes mix differs from the base cohort's "
                                          "(chi-squared p=")
    assert [(v["name"], v["test"], v["differs"]) for v in decision.evidence["cohort"]] == [("classes", "chi2", True)]
    strict = POLICY.model_copy(update={"cohort": CohortPolicy(abort=True)})
    decision, _ = decide_on(BASE + collapsed, policy=strict)
    assert decision.action == "abort" and "classes mix differs" in decision.reasons[0]
    lower = candidate(4, 96, 100, confidence=[0, 0, 0, 0, 100, 100, 0, 0, 0, 0])    # its confidence fell
    assert decide_on(BASE + lower)[0].action == "advance"     # by default another model's confidences may differ
    both = POLICY.model_copy(update={"cohort": CohortPolicy(confidence=True)})
    decision, _ = decide_on(BASE + lower, policy=both)
    assert decision.action == "hold" and "confidence mix differs" in decision.reasons[0]
    off = POLICY.model_copy(update={"cohort": CohortPolicy(enabled=False)})
    assert decide_on(BASE + collapsed, policy=off)[0].action == "advance"


def test_a_base_that_moved_off_the_releases_mix_does_not_hold_a_candidate_that_did_not():
    # After a field shift the base answers class 0 far too often; the retrained candidate answers as its test split
    # did (the reference signed into the channel entry): the mixes differ, and it is the base's doing.
    reference = DriftReference(classes=10, class_distribution=[0.1] * 10, confidence_histogram=[0.0] * 8 + [0.5, 0.5])
    shifted_base = [record(f"base-{i}", "7", classes=[110] + [10] * 9) for i in range(12)]
    decision, _ = decide_on(shifted_base + candidate(4, 70, 100), reference=reference)
    assert decision.action == "advance", decision.reasons
    assert [v["differs"] for v in decision.evidence["cohort"]] == [True]       # the test still says they differ
    collapsed = candidate(4, 70, 100, classes=[110] + [10] * 9)               # the other way round: held
    decision, _ = decide_on(BASE + collapsed, reference=reference)
    assert decision.action == "hold" and "classes mix differs" in decision.reasons[0]


def test_too_few_answers_in_a_cohort_hold_the_stage():
    decision, _ = decide_on(BASE[:1] + candidate(4, 96, 100))    # one base device: 200 answers, 200 needed: enough
    assert decision.action == "advance", decision.reasons
    thin = [record("base-0", "7", classes=[10] * 10)]
    decision, _ = decide_on(thin + candidate(4, 96, 100))
    assert decision.action == "hold" and decision.reasons[0] == \
        "hold: classes mix: 800 candidate and 100 base answers, 200 each needed"


# --- accuracy without labels ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:900], order[900:]
    model = LogisticRegression(max_iter=500, C=0.05).fit(x[train], y[train])
    return model, x[test], y[test]


def fleet_estimate(probs: np.ndarray, reference: DriftReference | None):
    """The estimate as the fleet computes it: answers counted per confidence tenth, rolled up, read back."""
    from edgeship.device.telemetry import confidence_bins

    counts = np.bincount(confidence_bins(probs.max(axis=1)), minlength=10).tolist()
    records = [record("d", "8", classes=np.bincount(probs.argmax(axis=1), minlength=10).tolist(), confidence=counts)]
    from edgeship.fleet.aggregate import aggregate

    return aggregate(records, reference=reference).versions["8"].estimated_accuracy


def test_the_accuracy_estimate_follows_a_shift_before_any_label(digits_model):
    from edgeship.device.telemetry import drift_reference

    model, x, y = digits_model
    half = len(x) // 2
    calibration, field_x, field_y = (x[:half], y[:half]), x[half:], y[half:]
    probs = model.predict_proba(calibration[0])
    reference = drift_reference(probs, version="8").model_copy(
        update={"confidence_accuracy": confidence_accuracy(probs, calibration[1])})
    clean = fleet_estimate(model.predict_proba(field_x), reference)
    noisy_x = np.clip(field_x + np.random.default_rng(1).normal(0, 0.5, field_x.shape), 0, 1)
    noisy = fleet_estimate(model.predict_proba(noisy_x), reference)
    clean_true = float((model.predict(field_x) == field_y).mean())
    noisy_true = float((model.predict(noisy_x) == field_y).mean())
    print(f"accuracy clean {clean_true:.3f} estimated {clean.accuracy:.3f}; "
          f"noisy {noisy_true:.3f} estimated {noisy.accuracy:.3f}")
    assert clean.method == "cbpe" and clean.answers == len(field_x)
    assert noisy_true < clean_true - 0.1                     # the shift costs accuracy ...
    assert noisy.accuracy < clean.accuracy - 0.05            # ... and the estimate falls with it
    assert abs(clean.accuracy - clean_true) < 0.05 and abs(noisy.accuracy - noisy_true) < 0.1
    uncalibrated = fleet_estimate(model.predict_proba(field_x), reference.model_copy(
        update={"confidence_accuracy": None}))
    assert uncalibrated.method == "uncalibrated" and 0 < uncalibrated.accuracy < 1


def test_on_its_own_calibration_set_the_estimate_is_the_labelled_accuracy(digits_model):
    model, x, y = digits_model
    probs = model.predict_proba(x)
    reference = DriftReference(classes=10, class_distribution=[0.1] * 10, confidence_histogram=[0.1] * 10,
                               confidence_accuracy=confidence_accuracy(probs, y))
    estimate = fleet_estimate(probs, reference)
    assert estimate.accuracy == pytest.approx(float((probs.argmax(axis=1) == y).mean()), abs=1e-5)
    detector = reference.model_copy(update={"task": "detection"})
    assert estimated_accuracy(Rollups().add_records([record("d", "8")]).classes.popitem()[1], detector) is None
