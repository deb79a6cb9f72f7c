"""The fleet store's batch path on SQLite and on a real PostgreSQL (a database of its own): duplicates and
redeliveries change nothing, the rollups equal a from-scratch aggregation of the same records (and a replay
rebuilds them), two writers at once sum exactly, old fixed-bucket records count, retention drops raw records
and keeps rollups."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from edgeship.fleet.aggregate import FleetSnapshot, aggregate
from edgeship.fleet.loadgen import FleetLoad, FleetProfile
from edgeship.device.telemetry_mqtt import MqttSettings
from edgeship.fleet.store import FleetStore

from fleet_records import HISTOGRAMS, record

NOW = datetime.now(timezone.utc).replace(microsecond=0)
REFERENCE = {"classes": 10, "class_distribution": [0.1] * 10, "confidence_histogram": [0.0] * 8 + [0.5, 0.5]}


def fleet_records(start: datetime = NOW - timedelta(hours=1), devices: int = 30, windows: int = 3):
    """Windows made by the WindowAggregator (loadgen templates: two versions, three classes, shadows, events), and
    a few schema 1 records with fixed-bucket latency, as devices of an older edgeship send them."""
    load = FleetLoad(FleetProfile(devices=devices, versions={"7": 0.6, "8": 0.4}, templates=2), MqttSettings())
    records = list(load.records(start, windows))
    HISTOGRAMS["format"] = "fixed"
    try:
        records += [record(f"old-{i}", "7", sequence=1, device_class="pi4", p99_ms=30.0, shadow=("8", 45, 50),
                           events=[("installed", "7", None)], at=start + timedelta(minutes=5)) for i in range(4)]
    finally:
        HISTOGRAMS["format"] = "exponential"
    return records


def summary(snapshot: FleetSnapshot) -> dict:
    """What a decision can read from a snapshot, in comparable form (float sums rounded: summed in another
    order, they differ in the last bits)."""
    out = {"records": snapshot.records, "devices": snapshot.devices}
    for version, stats in snapshot.versions.items():
        out[version] = {
            "devices": stats.devices, "inferences": stats.inferences, "errors": stats.errors,
            "classes": {c: (s.devices, s.inferences, s.latency.to_json(), s.p99_ms) for c, s in stats.classes.items()},
            "drift": stats.drift, "events": stats.events, "sums": {k: round(v, 9) for k, v in stats.sums.values.items()},
            "shadow": {**vars(stats.shadow), "confidence_diff": round(stats.shadow.confidence_diff or 0, 9)},
            "vectors": {k: v.tolist() for k, v in stats.sums.vectors.items()},
            "device_latency": {d: h.to_json() for d, h in stats.device_latency.items()},
            "device_class_of": stats.device_class_of, "device_fallbacks": stats.device_fallbacks}
    return out


def test_batches_with_duplicates_and_redeliveries_store_each_record_once(store_url):
    records = fleet_records()
    store = FleetStore(store_url)
    # redeliveries inside a batch, across batches and out of order (a collector reconnected, a device replayed)
    batches = [records[:50] + records[:5], records[40:70], records[::-1][:30], records[60:] + records[50:52],
               records[10:20]]
    new = [flag for batch in batches for flag in store.add_batch(batch)]
    assert sum(new) == len(records) == len({r.record_id for r in records})     # each stored exactly once
    assert store.count_records() == len(records)
    assert len(store.events()) == sum(len(r.events) for r in records)
    expected = summary(aggregate(records, reference=REFERENCE))
    assert summary(store.snapshot(None, reference=REFERENCE)) == expected      # rollups = from-scratch aggregation
    assert expected["8"]["shadow"]["samples"] > 0 and expected["7"]["events"].installed
    assert expected["7"]["classes"]["pi4"][2][4], "the schema 1 records' fixed buckets count in the rollups"

    # a later edgeship changes the rollup definition: replay rebuilds the same rollups from the raw records
    assert store.replay(chunk=37) == len(records)
    assert summary(store.snapshot(None, reference=REFERENCE)) == expected
    store.close()


def test_two_writers_at_once_sum_exactly(store_url):
    records = fleet_records(devices=40, windows=2)
    stores = [FleetStore(store_url), FleetStore(store_url)]
    halves = [records[: len(records) * 2 // 3], records[len(records) // 3:]]   # a third in both
    errors = []

    def write(store, part):
        try:
            for start in range(0, len(part), 16):
                store.add_batch(part[start:start + 16])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=pair) for pair in zip(stores, halves)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert stores[0].count_records() == len(records)
    assert summary(stores[1].snapshot(None)) == summary(aggregate(records))
    for store in stores:
        store.close()


def test_retention_drops_raw_records_and_keeps_the_rollups(store_url):
    old, recent = fleet_records(NOW - timedelta(days=10), devices=6, windows=1), fleet_records(devices=6, windows=1)
    recent = [r.model_copy(update={"record_id": r.record_id + "-new", "sequence": r.sequence + 100})
              for r in recent]
    store = FleetStore(store_url)
    store.add_batch(old + recent)
    before = summary(store.snapshot("stable"))
    counts = store.prune(keep_records_s=7 * 86400, keep_rollups_s=90 * 86400)
    assert store.count_records() == len(recent)
    assert {r.record_id for r in recent} == store.record_ids()
    if store.postgres:   # a day partition dropped whole (old records of the default partition deleted)
        assert counts["partitions"] >= 1
    else:
        assert counts["records"] == len(old)
    assert summary(store.snapshot("stable")) == before                         # rollups outlive raw records
    store.prune(keep_records_s=7 * 86400, keep_rollups_s=5 * 86400)
    assert store.snapshot("stable").records == sum(1 for r in recent if r.channel == "stable")
    store.close()
