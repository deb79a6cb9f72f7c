"""Downloads for the updater that always end: a minimum transfer rate and a deadline per file and per check.

python-tuf's own fetcher only bounds the wait between two bytes (30 s): a repository, proxy or
attacker that drips one byte every few seconds keeps a check (and the device's update lock) forever.
`BoundedFetcher` (a python-tuf `FetcherInterface`, passed to `tuf.ngclient.Updater(fetcher=...)`) also
ends a download when
    - after `grace_s`, fewer than `min_bytes_per_s` arrived over the last `grace_s` seconds;
    - it passes its own deadline: `grace_s` plus the signed length (the most it may be) at `min_bytes_per_s`;
    - the whole check passes `check_deadline` (a `time.monotonic()` value): later downloads fail at once.
It raises python-tuf's `SlowRetrievalError`, a download error: the check reports `error` and keeps the model.
The request head is bounded by the socket timeout between bytes.

    >>> fetcher = BoundedFetcher(min_bytes_per_s=4096, grace_s=30, check_deadline=time.monotonic() + 900)
    >>> tuf = Updater(..., fetcher=fetcher)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator

import urllib3
from tuf.api.exceptions import SlowRetrievalError
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

CHUNK = 64 * 1024  # small reads, so a stalled transfer is seen between them


class BoundedFetcher(Urllib3Fetcher):
    """python-tuf's urllib3 fetcher, with a minimum rate and a deadline per download and per check."""

    def __init__(self, min_bytes_per_s: float = 4096, grace_s: float = 30.0, check_deadline: float | None = None,
                 socket_timeout: float = 30, app_user_agent: str | None = None):
        super().__init__(socket_timeout=min(socket_timeout, grace_s), chunk_size=CHUNK, app_user_agent=app_user_agent)
        self.min_bytes_per_s, self.grace_s, self.check_deadline = min_bytes_per_s, grace_s, check_deadline
        self._max_length = 0

    def download_file(self, url: str, max_length: int):
        self._max_length = max_length  # the signed length (metadata: the configured maximum)
        return super().download_file(url, max_length)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self.check_deadline is not None and time.monotonic() > self.check_deadline:
            raise SlowRetrievalError(f"the update check passed its time limit before downloading {url}")
        return super()._fetch(url)

    def _chunks(self, response) -> Iterator[bytes]:
        start = time.monotonic()
        deadline = start + self.grace_s + self._max_length / self.min_bytes_per_s
        what = f"its deadline of {deadline - start:.0f} s"
        if self.check_deadline is not None and self.check_deadline < deadline:
            deadline, what = self.check_deadline, "the update check's time limit"
        watch = _Watch(response, start, deadline, what, self.min_bytes_per_s, self.grace_s)
        try:
            while chunk := response.read1(CHUNK):  # what has arrived, without waiting for a full chunk
                watch.received(len(chunk))
                yield chunk
        except Exception as error:
            if watch.why or isinstance(error, urllib3.exceptions.TimeoutError):
                raise SlowRetrievalError(watch.why or f"no byte arrived for {self.socket_timeout:g} s") from None
            raise
        finally:
            watch.stop()
            response.release_conn()
        if watch.why:  # the watch cut the transfer short: not a file that ended early
            raise SlowRetrievalError(watch.why)


class _Watch:
    """A thread that shuts a response down when its transfer is too slow or past its deadline."""

    def __init__(self, response, start: float, deadline: float, what: str, min_rate: float, window_s: float):
        self.response, self.start, self.deadline, self.what = response, start, deadline, what
        self.min_rate, self.window_s = min_rate, window_s
        self.why = ""
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque([(start, 0)])
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeship-download-watch", daemon=True)
        self._thread.start()

    def received(self, size: int) -> None:
        self._total += size

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        interval = min(1.0, self.window_s / 4)
        while not self._done.wait(interval):
            now = time.monotonic()
            self._samples.append((now, self._total))
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
                self._samples.popleft()
            since, then = self._samples[0]
            if now > self.deadline:
                self.why = f"the download passed {self.what} ({self._total} bytes arrived)"
            elif now - self.start >= self.window_s and (self._total - then) < self.min_rate * (now - since):
                self.why = (f"the download ran slower than {self.min_rate:g} bytes/s over {now - since:.0f} s "
                            f"({self._total - then} bytes arrived)")
            if self.why:
                with contextlib.suppress(Exception):
                    self.response.shutdown()  # unblocks the read in the downloading thread
                return
