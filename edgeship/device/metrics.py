"""`GET /metrics` on the device's two HTTP services, in Prometheus' text format (prometheus-client).

Both the agent and `edgeship-device serve` count every request by route and status code and time it
(`edgeship_http_requests_total`, `edgeship_http_request_duration_seconds`: an ASGI middleware, so a streamed
upload or answer is timed whole). `serve` adds the model's side: answers per slot and outcome with their
inference latency, switches to the fallback, the probation, the version in each slot, versions marked bad and
the telemetry spool's depth; the agent adds its job queue. What describes the device's state is read when
Prometheus scrapes (state.json, the spool), so it is never stale. Each app has its own registry: two apps in one
process (tests) never share counters.

    >>> install_serve_metrics(app, field)           # edgeship.device.serve_http.create_app
    >>> install_agent_metrics(app, jobs, [authorized])   # the agent's /metrics wants its token

    $ curl -s 127.0.0.1:8766/metrics | grep '^edgeship_model_version_info'
    edgeship_model_version_info{slot="active",version="7"} 1.0
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds, from a small int8 model on a fast core to a large one on a Cortex-A53.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
SLOTS = ("active", "fallback", "shadow", "last_known_good")


def install_serve_metrics(app: FastAPI, field) -> CollectorRegistry:
    """`/metrics` for `serve`: requests, inference per slot (a runtime observer) and the device's state."""
    registry = _install(app, [])
    observer = _InferenceCounters(registry)
    field.runtime.observers.append(observer)
    registry.register(_DeviceState(field))
    return registry


def install_agent_metrics(app: FastAPI, jobs, dependencies: list) -> CollectorRegistry:
    """`/metrics` for the agent (behind `dependencies`, its token check): requests and the job queue."""
    registry = _install(app, dependencies)
    registry.register(_JobQueue(jobs))
    return registry


def _install(app: FastAPI, dependencies: list) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("edgeship_http_requests", "HTTP requests answered, by route and status code",
                       ["route", "code"], registry=registry)
    duration = Histogram("edgeship_http_request_duration_seconds", "time from a request's start to its answer's end",
                         ["route"], buckets=LATENCY_BUCKETS, registry=registry)
    app.add_middleware(_Measured, requests=requests, duration=duration)

    @app.get("/metrics", dependencies=dependencies, include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry


class _Measured:
    """ASGI middleware: count and time each HTTP request under its route's template (bounded label values)."""

    def __init__(self, app, requests: Counter, duration: Histogram):
        self.app, self.requests, self.duration = app, requests, duration

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sent(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # FastAPI puts the matched route in the scope
            self.requests.labels(route, str(status)).inc()
            self.duration.labels(route).observe(time.perf_counter() - start)


class _InferenceCounters:
    """A DeviceRuntime observer: answers and their latency per slot, and switches to the fallback."""

    def __init__(self, registry: CollectorRegistry):
        self.answers = Counter("edgeship_inferences", "model runs by slot and outcome (ok, error)",
                               ["slot", "outcome"], registry=registry)
        self.latency = Histogram("edgeship_inference_latency_seconds", "a model run's latency, by slot",
                                 ["slot"], buckets=LATENCY_BUCKETS, registry=registry)
        self.fallbacks = Counter("edgeship_fallback_switches", "times answers moved from the active model to the "
                                 "fallback", registry=registry)
        self._slot = "active"

    def __call__(self, record) -> None:
        self.answers.labels(record.slot, "ok" if record.ok else "error").inc()
        self.latency.labels(record.slot).observe(record.latency_ms / 1000)
        if record.slot == "fallback" and self._slot != "fallback":
            self.fallbacks.inc()
        self._slot = record.slot


class _DeviceState(Collector):
    """What the state directory and the runtime say now: versions per slot, probation, bad versions, the spool."""

    def __init__(self, field):
        self.field = field

    def collect(self) -> Iterable:
        from edgeship.device.state import DeviceState

        state = DeviceState.load(self.field.state_dir)
        versions = GaugeMetricFamily("edgeship_model_version_info", "the version installed in each slot (1)",
                                     labels=["slot", "version"])
        for slot in SLOTS:
            model = getattr(state, slot)
            if model is not None:
                versions.add_metric([slot, str(model.version)], 1)
        yield versions
        serving = GaugeMetricFamily("edgeship_serving_slot", "1 for the slot answering now (active or fallback)",
                                    labels=["slot"])
        for slot in ("active", "fallback"):
            serving.add_metric([slot], 1 if self.field.runtime.slot == slot else 0)
        yield serving
        yield from _probation(state.probation)
        yield _gauge("edgeship_bad_versions", "versions this device marked bad (never installed again)", len(state.bad))
        reporter = self.field.reporter
        yield _gauge("edgeship_telemetry_spool_records", "telemetry records waiting in the spool",
                     len(reporter.spool) if reporter else 0)
        dropped = CounterMetricFamily("edgeship_telemetry_spool_dropped", "records the full spool dropped (oldest first)")
        dropped.add_metric([], reporter.spool.dropped if reporter else 0)
        yield dropped


def _probation(probation) -> Iterable:
    yield _gauge("edgeship_probation_active", "1 while the active model is on probation", int(probation is not None))
    counts = GaugeMetricFamily("edgeship_probation_inferences", "the probation's inferences so far, by kind "
                               "(required to confirm, successes, failures, slow)", labels=["kind"])
    if probation is not None:
        for kind in ("required", "successes", "failures", "slow"):
            counts.add_metric([kind], getattr(probation, kind))
    yield counts


class _JobQueue(Collector):
    """The agent's job queue, read at scrape time."""

    def __init__(self, jobs):
        self.jobs = jobs

    def collect(self) -> Iterable:
        yield _gauge("edgeship_agent_busy", "1 while a job runs", int(self.jobs.lock.locked()))
        yield _gauge("edgeship_agent_jobs_queued", "jobs waiting for their turn", self.jobs.waiting)
        for name, value, text in (("started", self.jobs.started, "jobs that started running"),
                                  ("failed", self.jobs.failed, "jobs that failed (answered 422)")):
            family = CounterMetricFamily(f"edgeship_agent_jobs_{name}", text)
            family.add_metric([], value)
            yield family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
