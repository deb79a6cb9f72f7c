"""Rollup contributor: the active model's answers compared with the model it replaced (every rollout).

A device serving a candidate runs the model it replaced (its rollback slot) on a sampled share of inputs
(edgeship.device.shadow) and reports the comparison in its record's `compared`. This adds it to the active
version's class and device rows under names that carry the compared version (`compared@<version>.samples`,
`.agreements`, `.confidence_diff_sum`, the compared model's `.latency`): the controller reads the candidate's
comparisons with its base, not with whatever older model a device happened to have before.
"""

from __future__ import annotations

from edgeship.records.telemetry import TelemetryRecord

PREFIX = "compared@"


def sum_name(compared_version: str, name: str) -> str:
    """The rollup sum `name` of comparisons with `compared_version`."""
    return f"{PREFIX}{compared_version}.{name}"


def compared_answers(record: TelemetryRecord, rows) -> None:
    """The comparison of the active version with the one it replaced, counted on the active version's rows
    (`rows`: edgeship.fleet.rollup.Rows, not imported here: rollup imports this module)."""
    compared, active = record.compared, record.versions.active
    if compared is None or not compared.version or not active:
        return
    fleet, device = rows.of_class(active), rows.of_device(active)
    for sums in (fleet, device):
        sums.count(sum_name(compared.version, "samples"), compared.samples)
        sums.count(sum_name(compared.version, "agreements"), compared.agreements)
    fleet.count(sum_name(compared.version, "confidence_diff_sum"), compared.confidence_diff_sum)
    fleet.count(sum_name(compared.version, "errors"), compared.errors)
    fleet.count(sum_name(compared.version, "skipped"), compared.skipped)
    fleet.histogram(sum_name(compared.version, "latency"), compared.latency.sketch())
