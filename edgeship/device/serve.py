"""`edgeship-device serve`: the on-device runtime as a local inference service, with shadow mode and telemetry.

`FieldRuntime` is what an application embeds when it wants the whole field loop: the runtime
(active model, fallback, probation, reload between requests), the shadow runner and the telemetry
reporter. `edgeship.device.serve_http` puts it behind HTTP on loopback or a Unix socket for applications written in
other languages:

    POST /predict   body: a .npy array (Content-Type application/x-npy) or JSON {"inputs": [[...]]}
                    -> {"outputs": [[...]], "slot": "active", "version": "7", "latency_ms": 0.41}
    POST /feedback  body: JSON {"request_id": "<from /predict>", "label": 3} (a batch: "labels": [3, 1])
                    -> {"request_id", "version", "correct": [true]}; 404 unknown or forgotten id, 409 labelled
    GET  /health    -> versions per slot, the runtime's slot now, telemetry counters

Requests are answered one at a time (the runtime is not re-entrant); a model the updater installed
is picked up between two requests, never in the middle of one (the hand-over).

    $ edgeship-device serve --state-dir /var/lib/edgeship --uds /run/edgeship.sock \\
          --broker 127.0.0.1:1883 --fleet lab --device-class pi4 --window-s 60

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np

from edgeship.device.feedback import DEFAULT_MAX_REQUESTS, AnsweredRequests, Feedback
from edgeship.device.field_samples import FieldSampler
from edgeship.device.field_upload import FieldUploader
from edgeship.device.http_server import add_server_arguments, server_limits
from edgeship.device.request_checks import RequestLimits
from edgeship.device.shadow import ShadowRunner
from edgeship.device.telemetry import DRIFT_REFERENCE_FILE, WindowAggregator, sensor_reader
from edgeship.records.telemetry import DeviceIdentity, DriftReference
from edgeship.device.telemetry_mqtt import MqttSettings, TelemetryReporter
from edgeship.device.telemetry_spool import Spool



def telemetry_identity(state_dir: Path, device_class: str) -> DeviceIdentity:
    """Who this device is, from the provisioned device.json and its active model."""
    from edgeship.device.state import active_model, device_identity

    identity = device_identity(state_dir)
    active = active_model(state_dir)
    return DeviceIdentity(device_id=identity.device_id, channel=identity.channel, target=identity.target or "",
                          model_name=active.model.model_name if active else "", device_class=device_class)


def _reference(state_dir: Path) -> DriftReference | None:
    path = state_dir / DRIFT_REFERENCE_FILE
    try:
        return DriftReference.model_validate_json(path.read_bytes()) if path.is_file() else None
    except ValueError:
        return None


class FieldRuntime:
    """The runtime with shadow mode and telemetry: `predict` answers, everything else happens beside it.

    Args:
        state_dir: the updater's state directory.
        telemetry: where to publish; None keeps the aggregator (and spool) but sends nothing.
        device_class: the operator's name for this kind of device ("pi4", "orin-nano"), reported per record.
        window_s: telemetry window.
        shadow_sample_rate: share of answers the shadow model (when one is installed) also runs on.
        compare_sample_rate: share of answers the model the active one replaced (the rollback slot, while installed)
            also runs on, in the same idle time: the candidate's agreement with the base on every rollout.
        feedback_requests: answers remembered for the application's late labels (`feedback`).

    Where the channel asks for field samples (its entry's `field_sampling`), `samples` keeps some inputs and
    a thread uploads them (edgeship.device.field_samples, edgeship.device.field_upload).
    """

    def __init__(self, state_dir: str | Path, telemetry: MqttSettings | None = None, device_class: str = "default",
                 window_s: float = 60.0, shadow_sample_rate: float = 0.1, threads: int = 1, sensors=None,
                 spool_max_records: int = 10_000, limits: RequestLimits = RequestLimits(),
                 feedback_requests: int = DEFAULT_MAX_REQUESTS, compare_sample_rate: float = 0.1):
        from edgeship.device.runtime import DeviceRuntime
        from edgeship.device.state import compared_model

        self.state_dir = Path(state_dir)
        telemetry_dir = self.state_dir / "telemetry"
        self.aggregator = WindowAggregator(telemetry_identity(self.state_dir, device_class), state_dir=self.state_dir,
                                           reference=_reference(self.state_dir), progress_dir=telemetry_dir,
                                           sensors=sensor_reader(sensors) if sensors else None)
        self.runtime = DeviceRuntime(self.state_dir, threads=threads, observers=[self.aggregator.on_inference],
                                     limits=limits)
        self.shadow = ShadowRunner(self.state_dir, self.aggregator.on_shadow, sample_rate=shadow_sample_rate,
                                   threads=threads)
        self.answers = AnsweredRequests(max_requests=feedback_requests)
        self.samples = FieldSampler(self.state_dir, self.aggregator.identity)
        self.compare = ShadowRunner(self.state_dir, self.aggregator.on_compared, sample_rate=compare_sample_rate,
                                    threads=threads, model=compared_model, name="edgeship-compare",
                                    disagreed=self.samples.prefer)
        self.answers.listeners.append(self.samples.on_feedback)
        self.aggregator.window_parts += [self.answers.window_fields, self.samples.window_fields]
        self.uploader = FieldUploader(self.samples).start()
        self.reporter = None
        if telemetry is not None:
            self.reporter = TelemetryReporter(self.aggregator, Spool(telemetry_dir, max_records=spool_max_records),
                                              telemetry, window_s=window_s)
            self.reporter.__enter__()
        self._lock = threading.Lock()
        self.answered = 0

    def predict(self, batch: np.ndarray):
        """The active model's (or the fallback's) answer; the shadow sees a sample of it afterwards."""
        runners = (self.shadow, self.compare)
        for runner in runners:
            runner.primary_started()
        try:
            with self._lock:
                prediction = self.runtime.predict(batch)
                self.answered += 1
            # The answer's id and the sampler's look are the primary's time too: the shadow waits for both.
            prediction = dataclasses.replace(prediction, request_id=self.answers.remember(
                prediction.version, prediction.outputs, prediction.task))
            self.samples.offer(batch, prediction, prediction.request_id)
        finally:
            for runner in runners:
                runner.primary_done()
        for runner in runners:
            runner.offer(batch, prediction)
        return prediction

    def feedback(self, request_id: str, label: int | list[int]) -> Feedback:
        """The application's true label (one per image of the request) for an answer `predict` gave, at any
        delay; raises edgeship.device.feedback.FeedbackRefused (UnknownRequest, AlreadyLabelled) saying why not."""
        return self.answers.label(request_id, label)

    def close(self) -> None:
        """Stop the shadow, flush the last window and give the spool a few seconds to drain (the rest stays spooled)."""
        self.shadow.stop()
        self.compare.stop()
        self.uploader.stop()
        self.runtime.close()  # a probation this process ran is taken over by the next start, not rolled back
        if self.reporter is not None:
            self.reporter.close(drain_s=5.0)

    def __enter__(self) -> FieldRuntime:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def health(self) -> dict:
        from edgeship.device.telemetry import slot_versions

        return {"versions": slot_versions(self.state_dir).model_dump(), "slot": self.runtime.slot,
                "reason": self.runtime.reason, "answered": self.answered,
                "telemetry_records": self.reporter.records if self.reporter else 0,
                "spooled": len(self.reporter.spool) if self.reporter else 0,
                "spool_dropped": self.reporter.spool.dropped if self.reporter else 0,
                "spool_quarantined": self.reporter.spool.quarantined if self.reporter else 0,
                "feedback": {"remembered": len(self.answers), "refused": self.answers.refused,
                             "forgotten": self.answers.forgotten},
                "field_samples": self.samples.totals}


# --- `edgeship-device serve` -------------------------------------------------------------------

def add_arguments(parser) -> None:
    """The flags of `edgeship-device serve`."""
    from edgeship.device.updater_cli import add_provisioning_arguments

    parser.add_argument("--state-dir", required=True, type=Path, help="the updater's state directory")
    add_provisioning_arguments(parser)  # as `update` takes them: written into device.json first
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=8766, help="loopback port (default: %(default)s)")
    where.add_argument("--uds", default=None, metavar="PATH", help="serve on this Unix socket instead")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads per model")
    parser.add_argument("--max-batch", type=int, default=RequestLimits.max_batch,
                        help="largest batch one request may hold (default: %(default)s)")
    parser.add_argument("--max-body-mb", type=float, default=RequestLimits.max_body_bytes / (1 << 20),
                        help="largest request body, refused with 413 beyond (default: %(default)s)")
    add_server_arguments(parser)
    parser.add_argument("--broker", default=None, metavar="HOST:PORT", help="MQTT broker for telemetry (none: off)")
    parser.add_argument("--fleet", default="default", help="telemetry topic namespace edgeship/<fleet>/...")
    parser.add_argument("--device-class", default="default", help="this kind of device, e.g. pi4 (per record)")
    parser.add_argument("--window-s", type=float, default=60.0, help="telemetry window (default: %(default)s)")
    parser.add_argument("--shadow-sample-rate", type=float, default=None,
                        help="share of answers the shadow also runs on (default: the channel entry's, else 0.1)")
    parser.add_argument("--compare-sample-rate", type=float, default=0.1,
                        help="share of answers the model the active one replaced also runs on, in idle time "
                             "(the rollout's agreement with the base; default: %(default)s)")
    parser.add_argument("--tls", action="store_true", help="connect to the broker over TLS")
    parser.add_argument("--ca-file", default=None)
    parser.add_argument("--cert-file", default=None)
    parser.add_argument("--key-file", default=None)
    parser.add_argument("--username", default=None)
    parser.add_argument("--password-env", default=None, metavar="VAR", help="environment variable holding the password")
    parser.add_argument("--update-every", type=float, default=0.0, metavar="SECONDS",
                        help="also run the OTA updater in this process every SECONDS (0: a separate "
                             "`edgeship-device update --interval` does it)")
    parser.add_argument("--confirm-after", type=int, default=20, help="good answers that confirm a new model")
    parser.add_argument("--feedback-requests", type=int, default=DEFAULT_MAX_REQUESTS, metavar="N",
                        help="answers remembered for POST /feedback, about 320 bytes each (default: %(default)s)")
    parser.set_defaults(run=run_serve)


def _broker(args) -> MqttSettings | None:
    if not args.broker:
        return None
    host, _, port = args.broker.rpartition(":")
    return MqttSettings(host=host or "127.0.0.1", port=int(port), fleet=args.fleet, tls=args.tls,
                        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                        username=args.username, password_env=args.password_env)


def update_loop(state_dir: Path, identity, every_s: float, confirm_after: int,
                stop: threading.Event) -> threading.Thread:
    """The updater of the provisioned `identity`, checking every `every_s` on a thread; the runtime confirms
    probation."""
    import random

    from edgeship.device.probation import ProbationPolicy
    from edgeship.device.updater import DeviceUpdater, UpdaterConfig

    updater = DeviceUpdater(UpdaterConfig(
        repository_url=identity.repository_url, trusted_root=Path(identity.root), state_dir=state_dir,
        channel=identity.channel, target=identity.target, self_check=False,
        probation=ProbationPolicy(required=confirm_after)))

    def loop() -> None:
        while not stop.is_set():
            report = updater.update()
            print(report.model_dump_json(), flush=True)
            stop.wait(every_s * random.uniform(0.9, 1.1))

    thread = threading.Thread(target=loop, name="edgeship-updater", daemon=True)
    thread.start()
    return thread


def run_serve(args) -> int:
    from edgeship.device.updater_cli import settled_identity

    identity = settled_identity(args, "serve")  # refuses a state directory nobody provisioned, naming the fix
    stop = threading.Event()
    if args.update_every > 0:
        update_loop(args.state_dir, identity, args.update_every, args.confirm_after, stop)
    limits = RequestLimits(max_batch=args.max_batch, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    field = FieldRuntime(args.state_dir, telemetry=_broker(args), device_class=args.device_class,
                         window_s=args.window_s, shadow_sample_rate=args.shadow_sample_rate or 0.1,
                         threads=args.threads, limits=limits, feedback_requests=args.feedback_requests,
                         compare_sample_rate=args.compare_sample_rate)
    from edgeship.device.serve_http import serve

    try:
        serve(field, host=args.host, port=args.port, uds=args.uds, limits=limits, server=server_limits(args))
    finally:
        stop.set()
    return 0
