"""Ground truth from the application: the true label of an answer it was given, at any delay.

Every answer of `FieldRuntime.predict` gets a request id (`Prediction.request_id`, and `request_id` in the
answer of `POST /predict`). The application reports the true label later, through `FieldRuntime.feedback(id,
label)` or `POST /feedback {"request_id": ..., "label": 3}` (a batch: `"labels": [3, 1]`, one per image).
`AnsweredRequests` keeps what it needs to score the answer: the version that answered and its top-1 classes,
for the last `max_requests` answers (50,000 by default) and at most `max_age_s` (7 days): about 320 bytes a
request, 16 MB at 50,000 (measured with tracemalloc, one image per request). A label for an id it never
gave, or one it has forgotten (older, or pushed out by newer answers), is refused as unknown (HTTP 404); a second label for the same answer as a conflict (409); a label
that is not a class of the answer (400). Nothing the application sends can stop the answers.

Labels are counted per version that answered (not the version answering now: a label may arrive after an
update) and true class; each telemetry window carries them (`TelemetryRecord.labels`), and the fleet side
rolls them up per version, class and device class (edgeship.fleet.field_accuracy).

    >>> answers = AnsweredRequests(max_requests=50_000)
    >>> request_id = answers.remember("7", logits)           # what FieldRuntime.predict does
    >>> answers.label(request_id, 3).correct                  # [True]
    >>> answers.window_fields()["labels"]                     # this window's LabelledAnswers per version

No torch, TensorFlow, MLflow or Prefect here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeship.records.telemetry import LabelledAnswers

DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_AGE_S = 7 * 86400.0


class FeedbackRefused(Exception):
    """A label the device cannot use; `status` is the HTTP status that says why."""

    status = 400


class UnknownRequest(FeedbackRefused):
    status = 404


class AlreadyLabelled(FeedbackRefused):
    status = 409


@dataclass(frozen=True)
class Feedback:
    """One label matched with the answer it is for."""

    request_id: str
    version: str
    labels: list[int]
    predicted: list[int]
    delay_s: float

    @property
    def correct(self) -> list[bool]:
        return [a == b for a, b in zip(self.labels, self.predicted)]


@dataclass(slots=True)
class _Answer:
    version: str
    predicted: tuple[int, ...]
    classes: int
    answered_at: float
    labelled: bool = False


@dataclass
class _Counts:
    labelled: int = 0
    correct: int = 0
    by_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    correct_by_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    delay_s_sum: float = 0.0


def _add_at(counts: np.ndarray, index: int) -> np.ndarray:
    if index >= len(counts):
        counts = np.pad(counts, (0, index + 1 - len(counts)))
    counts[index] += 1
    return counts


class AnsweredRequests:
    """The recent answers, by request id, and this window's labels per version (thread-safe).

    Args:
        max_requests: answers remembered; the oldest is forgotten first.
        max_age_s: an answer older than this takes no label.
        clock: seconds, for tests.
    """

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS, max_age_s: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], float] = time.time):
        if max_requests < 1 or max_age_s <= 0:
            raise ValueError("max_requests must be at least 1 and max_age_s positive")
        self.max_requests, self.max_age_s, self._clock = max_requests, max_age_s, clock
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._window: dict[str, _Counts] = {}
        self._lock = threading.Lock()
        self.forgotten = 0       # answers pushed out or expired before any label came
        self.refused = 0         # labels refused (unknown id, second label, not a class)
        self.listeners: list[Callable[[Feedback], None]] = []   # e.g. the field sampler: keep labelled inputs

    def __len__(self) -> int:
        return len(self._answers)

    def remember(self, version: str | None, outputs, task: str = "classification") -> str:
        """A new request id for this answer (a detector's answers get one too, but take no class labels)."""
        request_id = uuid.uuid4().hex
        values = np.asarray(outputs)
        scored = task == "classification" and version is not None and values.ndim >= 1 and values.size > 0
        rows = values.reshape(len(values), -1) if scored else np.zeros((0, 0))
        answer = _Answer(str(version), tuple(int(c) for c in rows.argmax(axis=1)) if scored else (),
                         rows.shape[1] if scored else 0, self._clock())
        with self._lock:
            self._answers[request_id] = answer
            self._expire(answer.answered_at)
        return request_id

    def _expire(self, now: float) -> None:
        while self._answers:
            oldest = next(iter(self._answers.values()))
            if len(self._answers) <= self.max_requests and now - oldest.answered_at <= self.max_age_s:
                return
            self._answers.popitem(last=False)
            self.forgotten += not oldest.labelled

    def label(self, request_id: str, labels: int | list[int]) -> Feedback:
        """Score the answer `request_id` against the true label(s); raises a FeedbackRefused saying why not."""
        wanted = [labels] if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool) else labels
        with self._lock:
            try:
                self._expire(self._clock())
                answer = self._answers.get(str(request_id))
                if answer is None:
                    raise UnknownRequest(f"no answer with request id {request_id!r} here: it was never given, or it "
                                         f"is older than the last {self.max_requests} answers or {self.max_age_s:g} s")
                if not answer.classes:
                    raise FeedbackRefused(f"request {request_id} was answered by a detector; feedback takes the true "
                                          f"class of a classifier's answer")
                if answer.labelled:
                    raise AlreadyLabelled(f"request {request_id} already has its label; each answer takes one")
                if (not isinstance(wanted, list) or len(wanted) != len(answer.predicted)
                        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in wanted)):
                    raise FeedbackRefused(f"request {request_id} answered {len(answer.predicted)} image(s): send "
                                          f"'label' (one image) or 'labels', one class index per image")
                if not all(0 <= v < answer.classes for v in wanted):
                    raise FeedbackRefused(f"labels {wanted} are not all classes of this model "
                                          f"(0..{answer.classes - 1})")
            except FeedbackRefused:
                self.refused += 1
                raise
            answer.labelled = True
            delay = max(0.0, self._clock() - answer.answered_at)
            counts = self._window.setdefault(answer.version, _Counts())
            for truth, predicted in zip(wanted, answer.predicted):
                counts.labelled += 1
                counts.by_class = _add_at(counts.by_class, int(truth))
                if truth == predicted:
                    counts.correct += 1
                    counts.correct_by_class = _add_at(counts.correct_by_class, int(truth))
                counts.delay_s_sum += delay
        feedback = Feedback(str(request_id), answer.version, [int(v) for v in wanted], list(answer.predicted), delay)
        for listener in self.listeners:
            listener(feedback)
        return feedback

    def window_fields(self) -> dict:
        """This window's labels as TelemetryRecord fields (`labels`), and a fresh window (a WindowAggregator part)."""
        with self._lock:
            window, self._window = self._window, {}
        return {"labels": [LabelledAnswers(version=version, labelled=c.labelled, correct=c.correct,
                                           by_class=c.by_class.tolist(), correct_by_class=c.correct_by_class.tolist(),
                                           delay_s_sum=round(c.delay_s_sum, 3))
                           for version, c in sorted(window.items())]}


def feedback_answer(field_runtime, body: bytes) -> tuple[int, dict]:
    """`POST /feedback`: (HTTP status, JSON answer) for a body {"request_id": ..., "label": n | "labels": [...]}."""
    try:
        request = json.loads(body)
        request_id, labels = request["request_id"], request["label"] if "label" in request else request["labels"]
    except (ValueError, KeyError, TypeError):
        return 400, {"detail": 'send JSON {"request_id": "<id from /predict>", "label": <class index>} '
                               '(a batch: "labels": [one per image])'}
    try:
        feedback = field_runtime.feedback(request_id, labels)
    except FeedbackRefused as refused:
        return refused.status, {"detail": str(refused)}
    return 200, {"request_id": feedback.request_id, "version": feedback.version, "correct": feedback.correct}
