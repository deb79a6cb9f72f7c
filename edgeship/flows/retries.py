"""Retries and timeouts of the tasks that talk to devices, servers and buckets, in one place.

| task | talks to | retried | bounded by |
| --- | --- | --- | --- |
| benchmark | device agents | inside the benchmark pool (`benchmark.retries`; a lost device's job moves) | each request: the agent's job timeout (`benchmark.timeout_s`, plus a sustained run) and a client timeout a little longer |
| publish-reports, register | MLflow (server, artifact store), Prefect's API | twice (a retried registration takes up the version it created) | - |
| resolve-release, record-publish | MLflow | twice | 30 min (downloads) |

A Prefect task timeout would add nothing to the benchmark: the tasks run on the flow's worker threads,
where Prefect cannot interrupt a blocking call (it says so), and every call to a device is bounded already.

Only what may pass on its own is retried (`transient`): a connection refused or reset, a timeout, an
HTTP client's or boto's error, MLflow's "internal error" or "temporarily unavailable". An edgeship error
(no such version, a failed gate, a hash mismatch, bad config) says what to fix, and a bug (a TypeError)
fails the same way every time: retrying either would only delay the message. Writes to the OTA bucket
are not retried here: boto3 retries each request (edgeship.ota.storage), and the writer lease keeps a
half-done publish from being repeated over another's.
"""

from __future__ import annotations

from edgeship.errors import EdgeshipError

_NETWORK_CLIENTS = ("requests", "urllib3", "httpx", "httpcore", "botocore", "boto3")
_MLFLOW_TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


def is_transient(error: BaseException) -> bool:
    """Whether `error` is a service's passing failure rather than bad input or a bug."""
    if isinstance(error, EdgeshipError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if type(error).__module__.split(".")[0] in _NETWORK_CLIENTS:
        return True
    return getattr(error, "error_code", None) in _MLFLOW_TRANSIENT  # mlflow.exceptions.MlflowException


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition (`retry_condition_fn`): retry only a transient failure."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - classified, not handled
        return is_transient(error)
    return False


# A service blip (a restarting MLflow server, a dropped connection) is retried after 5 s, then 30 s.
SERVICE_CALL = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_jitter_factor": 0.5,
                "retry_condition_fn": transient}
DOWNLOAD_TIMEOUT_S = 1800
