"""Ground truth from the application: answers remembered by request id, labels counted per answering version,
rolled up per version, class and device class, and judged by the controller (minimum accuracy, significant drop
against the base), on recorded fleet states stored and read back from the rollups as the controller reads them."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from edgeship.device.feedback import AlreadyLabelled, AnsweredRequests, FeedbackRefused, UnknownRequest
from edgeship.fleet.controller import RolloutStatus, decide
from edgeship.fleet.field_accuracy import by_device_class, drop_test, field_accuracy, FieldAccuracy
from edgeship.fleet.policy import ChannelPolicy
from edgeship.fleet.report import fleet_metrics
from edgeship.fleet.store import FleetStore

from fleet_records import T0, record

STATUS = RolloutStatus(channel="stable", target="onnx-int8", base_version="7", candidate_version="8", fraction=0.05,
                       stage_started_at=T0, latency_budget_ms=20.0)
NOW = T0 + timedelta(seconds=700)


def logits(classes: list[int], width: int = 10) -> np.ndarray:
    out = np.zeros((len(classes), width), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 5.0
    return out


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_labels_count_for_the_version_that_answered_late_and_out_of_order():
    clock = Clock()
    answers = AnsweredRequests(max_requests=100, clock=clock)
    first = [answers.remember("7", logits([c])) for c in (1, 2, 3)]
    clock.now += 3600                                  # an update to v8 in between; labels come an hour later
    second = answers.remember("8", logits([4, 5]))     # a batch of two
    assert answers.label(second, [4, 9]).correct == [True, False]
    for request_id, truth in reversed(list(zip(first, (1, 0, 3)))):   # out of order
        answers.label(request_id, truth)
    window = {entry.version: entry for entry in answers.window_fields()["labels"]}
    assert (window["7"].labelled, window["7"].correct) == (3, 2)
    assert window["7"].by_class == [1, 1, 0, 1] and window["7"].correct_by_class == [0, 1, 0, 1]
    assert (window["8"].labelled, window["8"].correct) == (2, 1)
    assert window["7"].delay_s_sum == pytest.approx(3 * 3600)
    assert answers.window_fields() == {"labels": []}   # the next window starts empty


def test_unknown_forgotten_expired_and_repeated_labels_are_refused_saying_why():
    clock = Clock()
    answers = AnsweredRequests(max_requests=2, max_age_s=60, clock=clock)
    oldest = answers.remember("7", logits([1]))
    kept = [answers.remember("7", logits([2])), answers.remember("7", logits([3]))]
    assert len(answers) == 2 and answers.forgotten == 1          # bounded: the oldest is gone
    with pytest.raises(UnknownRequest, match="older than the last 2 answers"):
        answers.label(oldest, 1)
    with pytest.raises(UnknownRequest, match="never given"):
        answers.label("not-an-id", 1)
    answers.label(kept[0], 2)
    with pytest.raises(AlreadyLabelled):
        answers.label(kept[0], 2)
    with pytest.raises(FeedbackRefused, match="0..9"):
        answers.label(kept[1], 12)
    with pytest.raises(FeedbackRefused, match="one class index per image"):
        answers.label(kept[1], [3, 3])
    clock.now += 61
    with pytest.raises(UnknownRequest):
        answers.label(kept[1], 3)                                # expired
    assert answers.refused == 6
    assert [e.labelled for e in answers.window_fields()["labels"]] == [1]


def labelled(version: str, right: int, wrong: int, device_class: str = "default", devices: int = 4,
             sequence: int = 1, classes: int = 10) -> list:
    """Records of `devices` devices whose windows carry labels for `version`'s answers (the device's own counting)."""
    records = []
    for d in range(devices):
        answers = AnsweredRequests()
        rng = np.random.default_rng(d)
        for i in range(right + wrong):
            truth = int(rng.integers(classes))
            answered = truth if i < right else (truth + 1) % classes
            answers.label(answers.remember(version, logits([answered])), truth)
        base = record(f"{device_class}-{version}-{d}", version, device_class=device_class, sequence=sequence,
                      events=[("installed", version, None), ("confirmed", version, None)],
                      compared=("7", 98, 100) if version == "8" else None)   # v8's answers against v7's it replaced
        records.append(base.model_copy(update=answers.window_fields()))
    return records


def snapshot_of(records):
    store = FleetStore("sqlite://")
    try:
        store.add_batch(records)
        return store.snapshot("stable", "onnx-int8", since=T0, versions=["8", "7"])
    finally:
        store.close()


def test_rollups_hold_labelled_accuracy_per_version_class_and_device_class():
    records = (labelled("8", 45, 5, "pi4") + labelled("8", 30, 20, "orin", devices=2)
               + labelled("7", 48, 2, devices=3))
    snapshot = snapshot_of(records)
    candidate = field_accuracy(snapshot.version("8").sums)
    assert (candidate.labelled, candidate.correct) == (4 * 50 + 2 * 50, 4 * 45 + 2 * 30)
    assert sum(n for n, _ in candidate.by_class.values()) == candidate.labelled
    assert sum(c for _, c in candidate.by_class.values()) == candidate.correct
    per_class = by_device_class(snapshot.version("8"))
    assert per_class["pi4"].accuracy == pytest.approx(0.9) and per_class["orin"].accuracy == pytest.approx(0.6)
    assert field_accuracy(snapshot.version("7").sums).accuracy == pytest.approx(48 / 50)
    metrics = fleet_metrics(snapshot.version("8"))          # what goes on the MLflow model version
    assert metrics["fleet.field_accuracy"] == pytest.approx(240 / 300) and metrics["fleet.field_labelled"] == 300
    assert metrics["fleet.field_accuracy.orin"] == pytest.approx(0.6)


def test_drop_test_needs_enough_labels_and_a_real_difference():
    assert drop_test(FieldAccuracy(300, 150), FieldAccuracy(300, 290), 0.02, 200).p_value < 1e-6
    small = drop_test(FieldAccuracy(20, 5), FieldAccuracy(20, 20), 0.02, 200)
    assert small.p_value < 0.01 and not small.sound                    # a big gap, but too few labels to judge
    same = drop_test(FieldAccuracy(400, 380), FieldAccuracy(400, 384), 0.02, 200)
    assert same.sound and same.p_value > 0.05                          # within the tolerated drop
    assert drop_test(FieldAccuracy(), FieldAccuracy(10, 9)) is None


def test_controller_aborts_on_a_significant_drop_against_the_base_on_the_same_stretch():
    policy = ChannelPolicy.model_validate({"min_reporting_devices": 4, "soak_s": 600,
                                           "field_accuracy": {"min_labelled": 150}})
    rotated = labelled("8", 25, 25)                      # 50% right: wrong on field inputs, fast and installed
    decision = decide(snapshot_of(rotated + labelled("7", 48, 2)), STATUS, policy, NOW)
    assert decision.action == "abort", decision.reasons
    assert "labelled field accuracy 0.500 vs base 0.960" in decision.reasons[0]
    assert decision.evidence["field_accuracy"]["drop_test"]["sound"]
    good = labelled("8", 48, 2)
    assert decide(snapshot_of(good + labelled("7", 48, 2)), STATUS, policy, NOW).action == "advance"
    few = labelled("8", 5, 5, devices=4)                 # 40 labels: not enough to conclude anything
    assert decide(snapshot_of(few + labelled("7", 48, 2)), STATUS, policy, NOW).action == "advance"


def test_minimum_labelled_accuracy_holds_the_candidate_until_met():
    policy = ChannelPolicy.model_validate({"min_reporting_devices": 4, "soak_s": 600,
                                           "field_accuracy": {"min_accuracy": 0.9, "min_labelled": 100,
                                                              "abort_on_drop": False}})
    base = labelled("7", 48, 2)
    waiting = decide(snapshot_of(labelled("8", 10, 0, devices=4) + base), STATUS, policy, NOW)
    assert waiting.action == "hold" and "hold: 40/100 labelled answers from the field" in waiting.reasons
    low = decide(snapshot_of(labelled("8", 40, 10) + base), STATUS, policy, NOW)
    assert low.action == "hold" and "hold: labelled field accuracy 0.800 < 0.9" in low.reasons
    assert decide(snapshot_of(labelled("8", 47, 3) + base), STATUS, policy, NOW).action == "advance"
