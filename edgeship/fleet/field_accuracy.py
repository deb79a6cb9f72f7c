"""Labelled field accuracy: the application's ground truth (edgeship.device.feedback), rolled up and judged.

Each telemetry record carries the labels that came in its window, per version that gave the answers
(`TelemetryRecord.labels`); edgeship.fleet.rollup_field adds them to the rollups (`labels.*`), per version,
true class and device class. This module reads them back and judges them.

The controller reads them through the policy's `field_accuracy` section:

- success: with `min_accuracy` set, the candidate advances only once it has `min_labelled` labelled
  answers and its labelled accuracy is at least `min_accuracy`;
- abort (`abort_on_drop`): the candidate's labelled accuracy is significantly lower than the base's on the
  same stretch (the labels each received since the rollout's start) by more than `max_drop`: a one-sided
  two-proportion z-test (unpooled: the null has a margin) at `significance`, only once both sides have
  `min_labelled` labels and there are at least 5 wrong and 5 right answers over both sides (below that the
  normal approximation is not sound, and nothing is concluded).

    >>> accuracy = field_accuracy(snapshot.version("8").sums)
    >>> accuracy.accuracy, accuracy.labelled
    >>> drop_test(accuracy, field_accuracy(snapshot.version("7").sums), max_drop=0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgeship.fleet.aggregate import VersionStats
from edgeship.fleet.policy import FieldAccuracyPolicy
from edgeship.fleet.rollup import Sums

MIN_EACH_SIDE = 5   # answers right and wrong, over both sides, before the normal approximation is trusted


@dataclass(frozen=True)
class FieldAccuracy:
    labelled: int = 0
    correct: int = 0
    by_class: dict[int, tuple[int, int]] = field(default_factory=dict)   # true class -> (labelled, correct)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def field_accuracy(sums: Sums) -> FieldAccuracy:
    """The labelled accuracy a rollup row (or a version's summed rows) holds."""
    labelled = sums.vectors.get("labels.by_class")
    correct = sums.vectors.get("labels.correct_by_class")
    by_class = {}
    if labelled is not None:
        for index, count in enumerate(labelled.tolist()):
            if count:
                right = int(correct[index]) if correct is not None and index < len(correct) else 0
                by_class[index] = (int(count), right)
    return FieldAccuracy(int(sums.get("labels.labelled")), int(sums.get("labels.correct")), by_class)


def by_device_class(stats: VersionStats) -> dict[str, FieldAccuracy]:
    return {name: field_accuracy(cls.sums) for name, cls in sorted(stats.classes.items())
            if cls.sums.get("labels.labelled")}


@dataclass(frozen=True)
class DropTest:
    candidate: float
    base: float
    z: float
    p_value: float
    sound: bool          # enough labels on both sides for the approximation


def drop_test(candidate: FieldAccuracy, base: FieldAccuracy, max_drop: float = 0.0,
              min_labelled: int = 1) -> DropTest | None:
    """One-sided two-proportion z-test of 'the candidate is worse than the base by more than `max_drop`'."""
    if not candidate.labelled or not base.labelled:
        return None
    pc, pb = candidate.correct / candidate.labelled, base.correct / base.labelled
    se = math.sqrt(pc * (1 - pc) / candidate.labelled + pb * (1 - pb) / base.labelled)
    z = (pb - max_drop - pc) / max(se, 1e-9)
    p_value = 0.5 * math.erfc(z / math.sqrt(2))
    wrong = candidate.labelled - candidate.correct + base.labelled - base.correct
    sound = (min(candidate.labelled, base.labelled) >= min_labelled
             and min(wrong, candidate.correct + base.correct) >= MIN_EACH_SIDE)
    return DropTest(round(pc, 6), round(pb, 6), round(z, 4), p_value, sound)


def evidence_of(stats: VersionStats | None) -> dict:
    if stats is None:
        return {}
    total = field_accuracy(stats.sums)
    return {"labelled": total.labelled, "accuracy": total.accuracy,
            "by_device_class": {c: a.accuracy for c, a in by_device_class(stats).items()}}


def abort_on_drop(stats: VersionStats, base: VersionStats | None,
                  policy: FieldAccuracyPolicy) -> tuple[list[str], dict]:
    """(abort reasons, evidence): the candidate's labelled accuracy significantly below the base's."""
    evidence = {"candidate": evidence_of(stats), "base": evidence_of(base)}
    if not policy.abort_on_drop or base is None:
        return [], evidence
    test = drop_test(field_accuracy(stats.sums), field_accuracy(base.sums), policy.max_drop, policy.min_labelled)
    if test is None:
        return [], evidence
    evidence["drop_test"] = {"z": test.z, "p_value": test.p_value, "sound": test.sound, "max_drop": policy.max_drop}
    if test.sound and test.p_value < policy.significance:
        return [f"abort: labelled field accuracy {test.candidate:.3f} vs base {test.base:.3f} on the same stretch "
                f"(drop > {policy.max_drop:g}, p={test.p_value:.2g} < {policy.significance:g})"], evidence
    return [], evidence


def unmet(stats: VersionStats | None, policy: FieldAccuracyPolicy) -> list[str]:
    """What the candidate still lacks of the minimum labelled field accuracy (nothing when none is set)."""
    if policy.min_accuracy is None:
        return []
    total = field_accuracy(stats.sums) if stats is not None else FieldAccuracy()
    if total.labelled < policy.min_labelled:
        return [f"{total.labelled}/{policy.min_labelled} labelled answers from the field"]
    if total.accuracy < policy.min_accuracy:
        return [f"labelled field accuracy {total.accuracy:.3f} < {policy.min_accuracy}"]
    return []


def metrics(stats: VersionStats) -> dict[str, float | None]:
    """Fleet metrics for the MLflow model version: labelled accuracy overall and per device class, samples."""
    total = field_accuracy(stats.sums)
    values: dict[str, float | None] = {"fleet.field_accuracy": total.accuracy,
                                       "fleet.field_labelled": float(total.labelled)}
    values.update({f"fleet.field_accuracy.{c}": a.accuracy for c, a in by_device_class(stats).items()})
    for name in ("uploaded", "uploaded_bytes", "dropped"):
        if stats.sums.get(f"samples.{name}"):
            values[f"fleet.field_samples_{name}"] = float(stats.sums.get(f"samples.{name}"))
    return values
