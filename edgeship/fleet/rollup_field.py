"""Rollup contributors for the field's truth (edgeship.fleet.rollup.CONTRIBUTORS): the applications' labels and
the devices' field samples, added to the rows as named sums (read back by edgeship.fleet.field_accuracy).

    labels.labelled, labels.correct             class and device rows of the version that gave the answers
    labels.by_class, labels.correct_by_class    class rows: per true class
    labels.delay_s_sum                          class rows: label received - answer given, summed
    samples.kept|uploaded|uploaded_bytes|dropped|upload_failures   class and device rows of the active version

A contributor is `(record, rows) -> None`; `rows` is an edgeship.fleet.rollup.Rows (not imported: the rollup
module imports this one).
"""

from __future__ import annotations

from edgeship.records.telemetry import TelemetryRecord

SAMPLE_COUNTS = ("kept", "uploaded", "uploaded_bytes", "dropped", "upload_failures")


def labelled_answers(record: TelemetryRecord, rows) -> None:
    """Rollup contributor: labels counted for the version that gave the answers."""
    for entry in record.labels:
        if not entry.version or not entry.labelled:
            continue
        fleet, device = rows.of_class(entry.version), rows.of_device(entry.version)
        for sums in (fleet, device):
            sums.count("labels.labelled", entry.labelled)
            sums.count("labels.correct", entry.correct)
        fleet.vector("labels.by_class", entry.by_class)
        fleet.vector("labels.correct_by_class", entry.correct_by_class)
        fleet.count("labels.delay_s_sum", entry.delay_s_sum)


def field_samples(record: TelemetryRecord, rows) -> None:
    """Rollup contributor: the window's field samples, counted for the active version."""
    samples, version = record.field_samples, record.versions.active
    if samples is None or not version:
        return
    for sums in (rows.of_class(version), rows.of_device(version)):
        for name in SAMPLE_COUNTS:
            sums.count(f"samples.{name}", getattr(samples, name))
