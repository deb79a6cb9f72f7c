"""The fleet loop at 10,000 and 100,000 devices: ingest rate, controller pass cost, histogram error.

One run, on PostgreSQL (the machine's server at 127.0.0.1:5432, a database of its own per store, dropped
after) and on SQLite:

  ingest      records/s sustained through MQTT (a Mosquitto of its own, max_inflight_messages 1000) ->
              `edgeship fleet collect` processes (1, then 2 on a shared subscription) -> the store, rollups
              included. The load generator (edgeship.fleet.loadgen, 10,000 simulated devices) publishes
              --ingest-records windows as fast as it can; the rate is the store's, from 10% to 90% stored.
  pass        one controller pass (rollout decision for the target, then the drift check) in a fresh process,
              time and peak RSS, on stores holding the rollups of 10,000 devices at hour 1 and at hour 24 of a
              rollout (candidate on 25%, 10% of the base shadowing it, 3 device classes) and of 100,000 at hour
              24. The pass reads rollups only (checked: no statement touches telemetry_records), so "at hour H"
              means the rollup rows H hours create: one device row per (version, device) and one class row per
              (version, class, 5-minute bucket) over H hours, device histograms as wide as a day of answers
              makes them (2,000 per loaded window at hour 24), and a decision per minute in the timeline. They
              are bulk-loaded through the store's own batch path (`add_batch`) with few raw records per device.
  histogram   p50/p95/p99 of merged exponential histograms against the exact quantiles of the same samples,
              beside the old fixed buckets' error.

    .venv/bin/python benchmarks/fleet_scale.py                  # about 7 minutes on 2 shared cores
    .venv/bin/python benchmarks/fleet_scale.py --quick          # smaller sizes, a smoke run

Prints a table, writes benchmarks/results/fleet_scale.json (with a `targets` section); exits 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
FLEET, CHANNEL, TARGET, BUDGET_MS = "bench", "stable", "onnx-int8", 50.0


# --- stores ---------------------------------------------------------------------------------

@contextmanager
def store_url(backend: str, directory: Path, name: str):
    """A fresh store: a SQLite file, or a PostgreSQL database of its own, dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{directory}/{name}.db"
        return
    import psycopg

    database = f"edgeship_bench_{name}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# --- histogram error ------------------------------------------------------------------------

def histogram_error(samples_per_kind: int = 200_000) -> dict:
    from edgeship.records.histogram import ExpHistogram, legacy_bucket, merge_all
    from edgeship.records.telemetry import Histogram

    rng = np.random.default_rng(0)
    kinds = {"lognormal (pi4-like)": rng.lognormal(np.log(12), 0.25, samples_per_kind),
             "bimodal (preempted tail)": np.r_[rng.lognormal(np.log(2), 0.1, samples_per_kind * 97 // 100),
                                               rng.uniform(20, 80, samples_per_kind * 3 // 100)],
             "heavy tail (pareto)": 1.0 + rng.pareto(2.5, samples_per_kind)}
    out = {}
    for kind, values in kinds.items():
        windows = np.array_split(values, 1000)                         # 1,000 windows merged as the rollups do
        merged = merge_all(ExpHistogram.of(w) for w in windows)
        old = {}
        for value in values[:20_000]:
            old[legacy_bucket(value)] = old.get(legacy_bucket(value), 0) + 1
        legacy = Histogram(counts=old)
        row = {}
        for q in (0.5, 0.95, 0.99):
            exact = float(np.quantile(values, q, method="inverted_cdf"))
            exact_old = float(np.quantile(values[:20_000], q, method="inverted_cdf"))
            upper_edge = _legacy_upper_edge(legacy, q)
            row[f"p{round(q * 100)}"] = {"exact_ms": round(exact, 4), "estimate_ms": round(merged.quantile(q), 4),
                                          "relative_error": abs(merged.quantile(q) - exact) / exact,
                                          "old_buckets_relative_error": abs(upper_edge - exact_old) / exact_old}
        out[kind] = row
    return out


def _legacy_upper_edge(histogram, q: float) -> float:
    """What the old fixed buckets reported: the upper edge of the bucket holding the quantile."""
    from edgeship.records.histogram import LEGACY_EDGES_MS

    rank, seen = int(np.ceil(q * histogram.total)), 0
    for index in sorted(histogram.counts):
        seen += histogram.counts[index]
        if seen >= rank:
            return LEGACY_EDGES_MS[min(index, len(LEGACY_EDGES_MS) - 1)]
    return LEGACY_EDGES_MS[-1]


# --- ingest ---------------------------------------------------------------------------------

def ingest(backend: str, collectors: int, records: int, directory: Path) -> dict:
    import yaml

    from edgeship.device.telemetry_mqtt import MqttSettings
    from edgeship.fleet.broker import LocalBroker
    from edgeship.fleet.collector import wait_until
    from edgeship.fleet.loadgen import FleetLoad, FleetProfile
    from edgeship.fleet.store import FleetStore

    work = directory / f"ingest-{backend}-{collectors}"
    work.mkdir()
    with store_url(backend, work, "ingest") as url, LocalBroker() as broker:
        fleet = f"{FLEET}{uuid.uuid4().hex[:6]}"
        (work / "params.yaml").write_text(yaml.safe_dump({"fleet": {
            "name": fleet, "store": url, "broker": {"host": "127.0.0.1", "port": broker.port}}}))
        store = FleetStore(url)
        processes = [subprocess.Popen([sys.executable, "-m", "edgeship.cli", "fleet", "collect", "-C", str(work),
                                       "--member", f"m{i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for i in range(collectors)]
        try:
            load = FleetLoad(FleetProfile(devices=10_000, templates=4), MqttSettings(port=broker.port, fleet=fleet),
                             connections=2)
            time.sleep(4.0)  # the collectors import, connect and subscribe
            marks: dict[str, float] = {}
            began = time.monotonic()
            published = load.publish(rate=1e9, count=records)
            while time.monotonic() - began < 600:
                stored = store.count_records()
                for share in (0.1, 0.9, 1.0):
                    if stored >= share * records and str(share) not in marks:
                        marks[str(share)] = time.monotonic()
                if stored >= records:
                    break
                time.sleep(0.2)
            steady = (marks["0.9"] - marks["0.1"]) if {"0.1", "0.9"} <= marks.keys() else None
            rate = 0.8 * records / steady if steady else None
            stored = store.count_records()
            snapshot_devices = store.snapshot(CHANNEL, TARGET).devices
        finally:
            for process in processes:
                process.terminate()
            outputs = [process.communicate(timeout=60)[0].strip().splitlines()[-1:] for process in processes]
            store.close()
    return {"backend": backend, "collectors": collectors, "records": records, "stored": stored,
            "records_per_s": round(rate, 1) if rate else None, "publish": published,
            "devices_in_rollups": snapshot_devices, "collector_said": outputs,
            "all_stored_after_s": round(marks.get("1.0", time.monotonic()) - began, 2)}


# --- controller pass ------------------------------------------------------------------------

def load_rollout(url: str, devices: int, hours: int, directory: Path) -> dict:
    """Fill a store with the rollups of `devices` devices `hours` into a rollout (see the module docstring)."""
    from edgeship.device.telemetry_mqtt import MqttSettings
    from edgeship.fleet.loadgen import FleetLoad, FleetProfile
    from edgeship.fleet.store import FleetStore
    from edgeship.records.telemetry import TelemetryRecord

    store = FleetStore(url)
    bucket_s, buckets = store.bucket_s, int(hours * 3600 / store.bucket_s)
    per_device = 1 if devices * 1 >= 4 * buckets * 6 else 2
    profile = FleetProfile(devices=devices, versions={"7": 0.75, "8": 0.25}, templates=2,
                           answers_per_window=60 if hours <= 1 else 2000)
    load = FleetLoad(profile, MqttSettings())
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=hours)
    began, batch, stored = time.monotonic(), [], 0
    for index in range(devices):
        for k in range(per_device):
            slot = (index * per_device + k) % buckets
            _, payload = load.window(index, k + 1, start + timedelta(seconds=slot * bucket_s + bucket_s / 2))
            batch.append((TelemetryRecord.from_bytes(payload), payload))
            if len(batch) == 1000:
                stored += sum(store.add_batch([r for r, _ in batch], payloads=[p for _, p in batch]))
                batch = []
    if batch:
        stored += sum(store.add_batch([r for r, _ in batch], payloads=[p for _, p in batch]))
    load_s = time.monotonic() - began
    # the controller's timeline: a decision a minute since the candidate's first stage
    evidence = {"candidate": {"devices": devices // 4}, "abort_criteria": {"latency": {"executed": devices // 4,
                                                                                      "failed": []}}}
    for minute in range(hours * 60):
        first = minute == 0
        store.add_decision(channel=CHANNEL, target=TARGET, version="8", action="advance" if first else "hold",
                           fraction_before=0.0 if first else 0.25, fraction_after=0.25, applied=first,
                           reasons=["start" if first else "hold: soaking"], evidence=evidence,
                           at=start + timedelta(minutes=minute))
    store.close()
    return {"devices": devices, "hours": hours, "raw_records": stored, "records_per_device": per_device,
            "load_s": round(load_s, 1), "load_records_per_s": round(stored / load_s, 1)}


def run_pass(url: str, repo_dir: Path, repeats: int = 2) -> dict:
    """Run `fleet_scale.py pass` in a fresh process: its time per pass and peak RSS."""
    out = subprocess.run([sys.executable, __file__, "pass", "--store", url, "--repo", str(repo_dir),
                          "--repeats", str(repeats)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the pass failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pass_main(args) -> int:
    """In the child: open the store and the repository, then time `repeats` passes (decision + drift check)."""
    from sqlalchemy import event

    from edgeship.fleet.drift import drift_checks
    from edgeship.fleet.policy import ChannelPolicy, RetrainingPolicy
    from edgeship.fleet.rollout import control_channel
    from edgeship.fleet.store import FleetStore
    from edgeship.ota.keys import Keystore
    from edgeship.ota.repository import OtaRepository
    from edgeship.ota.storage import open_storage

    store = FleetStore(args.store)
    raw_reads = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: raw_reads.append(statement)
                 if "telemetry_records" in statement else None)
    repository = OtaRepository(open_storage(str(args.repo / "ota-repo")), Keystore(args.repo / "keys"))
    policy = ChannelPolicy.model_validate({"stages": [0.05, 0.25, 0.5, 1.0], "min_reporting_devices": 50,
                                           "soak_s": 1800, "success": {"p99_budget_ms": {"pi4": BUDGET_MS},
                                                                       "min_shadow_agreement": 0.95}})
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, decisions = [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        results = control_channel(repository, store, CHANNEL, policy, apply=False)
        drift_checks(repository, store, CHANNEL, RetrainingPolicy(max_drift_psi=50.0), datetime.now(timezone.utc),
                     start=lambda deployment, reason: "not started")
        times.append(time.perf_counter() - began)
        decisions.append((results[0].decision.action, results[0].decision.reasons[:2],
                          results[0].decision.evidence["candidate"].get("devices")))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": [round(t, 3) for t in times], "peak_rss_mb": round(peak_mb, 1),
                      "rss_before_pass_mb": round(baseline_mb, 1), "decision": decisions[-1],
                      "raw_record_statements": len(raw_reads)}))
    return 0


def controller_passes(backend: str, sizes: list[tuple[int, int]], directory: Path) -> list[dict]:
    from ota_world import OtaWorld

    world_dir = directory / f"repo-{backend}"
    world_dir.mkdir()
    world = OtaWorld(world_dir)
    from edgeship.device.telemetry_mqtt import MqttSettings
    from edgeship.fleet.loadgen import FleetLoad, FleetProfile

    reference = FleetLoad(FleetProfile(devices=1, templates=1), MqttSettings()).reference.model_dump()
    try:
        world.publish("7", budget_ms=BUDGET_MS, drift_reference=reference)
        world.publish("8", rollout_fraction=0.25, budget_ms=BUDGET_MS, drift_reference=reference)
    finally:
        world.close()
    rows = []
    for devices, hours in sizes:
        with store_url(backend, directory, f"pass{devices}h{hours}") as url:
            loaded = load_rollout(url, devices, hours, directory)
            measured = run_pass(url, world_dir)
            rows.append({"backend": backend, **loaded, **measured, "pass_s": measured["seconds"][-1]})
            print(f"  {backend} {devices} devices, hour {hours}: pass {rows[-1]['pass_s']:.2f} s, "
                  f"peak RSS {measured['peak_rss_mb']:.0f} MB (load {loaded['load_s']:.0f} s)", flush=True)
    return rows


# --- the run --------------------------------------------------------------------------------

def targets_of(result: dict) -> dict:
    targets = {}
    pg_one = [r for r in result["ingest"] if r["backend"] == "postgresql" and r["collectors"] == 1]
    if pg_one:
        rate = pg_one[0]["records_per_s"] or 0
        targets["ingest_postgresql_1_collector"] = {"limit": ">= 2000 records/s", "measured": rate,
                                                    "met": rate >= 2000}
    for backend in result["backends"]:
        passes = {(r["devices"], r["hours"]): r for r in result["passes"] if r["backend"] == backend}
        h1, h24, big = passes.get((10_000, 1)), passes.get((10_000, 24)), passes.get((100_000, 24))
        if h1 and h24:
            ratio = h24["pass_s"] / h1["pass_s"]
            targets[f"{backend}_10k_hour24_over_hour1"] = {"limit": "<= 1.5", "measured": round(ratio, 3),
                                                           "met": ratio <= 1.5}
            targets[f"{backend}_10k_hour24_pass_s"] = {"limit": "< 5", "measured": h24["pass_s"],
                                                       "met": h24["pass_s"] < 5}
            targets[f"{backend}_10k_hour24_peak_rss_mb"] = {"limit": "< 500", "measured": h24["peak_rss_mb"],
                                                            "met": h24["peak_rss_mb"] < 500}
        if big:
            targets[f"{backend}_100k_hour24_pass_s"] = {"limit": "< 30", "measured": big["pass_s"],
                                                        "met": big["pass_s"] < 30}
            targets[f"{backend}_100k_hour24_peak_rss_mb"] = {"limit": "< 2048", "measured": big["peak_rss_mb"],
                                                             "met": big["peak_rss_mb"] < 2048}
        for row in passes.values():
            targets[f"{backend}_{row['devices']}_h{row['hours']}_reads_no_raw_records"] = {
                "limit": 0, "measured": row["raw_record_statements"], "met": row["raw_record_statements"] == 0}
    worst = max(v["relative_error"] for kind in result["histogram"].values() for v in kind.values())
    targets["histogram_quantile_relative_error"] = {"limit": "<= 0.02", "measured": round(worst, 5),
                                                     "met": worst <= 0.02}
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "pass"])
    parser.add_argument("--store"), parser.add_argument("--repo", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--ingest-records", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 devices, 5,000 ingested records")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fleet_scale.json")
    args = parser.parse_args(argv)
    if args.mode == "pass":
        return pass_main(args)
    began = time.monotonic()
    backends = args.backends.split(",")
    sizes = [(1_000, 1), (1_000, 24), (10_000, 24)] if args.quick else [(10_000, 1), (10_000, 24), (100_000, 24)]
    records = 5_000 if args.quick else args.ingest_records
    load_before = os.getloadavg()
    result = {"backends": backends, "load_average_before": load_before, "histogram": histogram_error(),
              "ingest": [], "passes": []}
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        directory = Path(tmp)
        for backend in backends:
            for collectors in (1, 2):
                row = ingest(backend, collectors, records, directory)
                result["ingest"].append(row)
                print(f"  ingest {backend}, {collectors} collector(s): {row['records_per_s']} records/s "
                      f"({row['stored']}/{records} stored)", flush=True)
        for backend in backends:
            result["passes"] += controller_passes(backend, sizes, directory)
    result["load_average_after"] = os.getloadavg()
    result["wall_s"] = round(time.monotonic() - began, 1)
    result["targets"] = targets_of(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nload average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after "
          f"(2 cores shared with other work)")
    print(f"{'ingest':<34} {'records/s':>10}")
    for row in result["ingest"]:
        print(f"{row['backend'] + ', ' + str(row['collectors']) + ' collector(s)':<34} {row['records_per_s']!s:>10}")
    print(f"\n{'controller pass':<34} {'s':>7} {'peak RSS MB':>12} {'raw reads':>10}")
    for row in result["passes"]:
        name = f"{row['backend']}, {row['devices']} devices, hour {row['hours']}"
        print(f"{name:<34} {row['pass_s']:>7.2f} {row['peak_rss_mb']:>12.0f} {row['raw_record_statements']:>10}")
    print(f"\n{'histogram (1,000 windows merged)':<34} {'p50':>8} {'p95':>8} {'p99':>8}   old buckets p99")
    for kind, row in result["histogram"].items():
        print(f"{kind:<34} " + " ".join(f"{row[q]['relative_error']:>8.2%}" for q in ("p50", "p95", "p99"))
              + f"   {row['p99']['old_buckets_relative_error']:.1%}")
    print("\ntargets: " + ", ".join(f"{k} {'met' if v['met'] else 'MISSED'}" for k, v in result["targets"].items()))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
