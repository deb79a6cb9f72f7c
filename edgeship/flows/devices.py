"""The release's benchmark devices, connected while the earlier stages run.

Starting the loopback agents (a device without a URL: a process with FastAPI and the runtimes)
takes seconds. Benchmarks come last, so the release starts them at its beginning, on a thread, and
the benchmark stage takes them when it gets there: on a re-run whose stages all come from the cache
that start no longer adds to the wait. Remote devices are only resolved here (their URL and token).

    >>> devices = DevicesStarting(params.devices, params.benchmark)
    >>> ...                                   # data, training, quantization, compile
    >>> endpoints = devices.endpoints()       # waits for the agents; raises what starting them raised
    >>> devices.close()                       # stops the loopback agents
"""

from __future__ import annotations

import concurrent.futures

from edgeship.config import BenchmarkParams, DeviceParams


class DevicesStarting:
    """`connected_devices(...)` entered on a thread now; `endpoints()` waits for it, `close()` leaves it."""

    def __init__(self, devices: list[DeviceParams], params: BenchmarkParams):
        from edgeship.tasks.benchmark import connected_devices

        self._context = connected_devices(devices, params)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeship-devices")
        self._entered = self._executor.submit(self._context.__enter__)

    def endpoints(self):
        """The connected devices (DeviceEndpoint list), once every loopback agent answers /health."""
        return self._entered.result()

    def close(self) -> None:
        """Stop the loopback agents (after they finished starting, if they had not yet)."""
        try:
            self._entered.result()
        except Exception:  # noqa: BLE001 - they never started: nothing to stop (endpoints() raised it already)
            return
        finally:
            self._executor.shutdown(wait=True)
        self._context.__exit__(None, None, None)
