"""The fake server's world: one account's tasks and face sessions, its clock and its fault plan.

Nothing here runs on a timer.  A task records when it was born, when it starts processing and
when it ends, and its state is computed from the event loop's clock whenever someone looks
(docs/protocol.md, Task states: submitted -> processing -> succeed | failed).
"""

from __future__ import annotations

import collections
import heapq
import random
import string
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

__all__ = [
    "CONTENT_POLICY_REASON",
    "NO_HUMAN_REASON",
    "Account",
    "Clock",
    "FaceSession",
    "FakeFace",
    "FakeTask",
    "FaultPlan",
    "TaskLimitReached",
]

#: The official failure reason for a video without a person in it (DMXAPI's page;
#: docs/protocol.md, Task states).
NO_HUMAN_REASON = "there is no human in the video"
#: The failure reason given to tasks failed by :attr:`FaultPlan.task_failure_rate`.
CONTENT_POLICY_REASON = "Failure to pass the risk control system: content-security policy"

Dialect = Literal["kling", "apimodels"]
Stage = Literal["lip-sync", "identify-face", "advanced-lip-sync"]
State = Literal["submitted", "processing", "succeed", "failed"]
Outcome = Literal["succeed", "failed"]
#: Seconds a task takes, or a function drawing them from the server's seeded random generator.
Duration = float | Callable[[random.Random], float]


def _rate(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be from 0 to 1, not {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{attribute.name} must be at least 0, not {value!r}")


@attrs.frozen(kw_only=True)
class FaultPlan:
    """Failures the fake server injects; everything is off by default.

    Rates are shares of requests (or tasks) from 0 to 1, drawn from the server's seeded random
    generator so that a run can be repeated.

    * ``http_500_rate``: answer HTTP 500 with an HTML page, before doing anything.
    * ``errors_as_http_200``: send business errors with HTTP 200 and only the body ``code``
      (a gateway quirk: docs/protocol.md, Business codes).
    * ``data_as_list``: a single-task query's ``data`` is a one-element list (DMXAPI's quirk).
    * ``malformed_json_rate``: answer HTTP 200 with truncated JSON, after acting (a submit's
      task exists); with ``errors_as_http_200`` a submit's is a refusal sent with HTTP 200,
      before acting (nothing created), as only such a gateway can answer.
    * ``task_failure_rate``: tasks that end ``failed`` with a content-policy reason.
    * ``answer_delay``: seconds between creating a task and answering its submit (crash tests:
      the task exists before the client hears of it).
    * ``query_error_rate``: queries answered 5000 with HTTP 500 (JSON), before acting.
    * ``bad_gateway_rate``: a task-creating submit answered HTTP 502 with a proxy's HTML page
      before it reaches the service: nothing is created (the client cannot tell: a 502 may
      also come after the service acted).
    * ``lost_answer_rate``: a task-creating submit creates its task, then its answer is cut off
      (truncated JSON): the task exists, the client does not know its id.
    * ``create_delay``: seconds a submit takes before its task exists (a slow service: a client
      that gives up sooner looks for the task before it is there).  An external id is taken
      from the start.
    """

    http_500_rate: float = attrs.field(default=0.0, validator=_rate)
    errors_as_http_200: bool = False
    data_as_list: bool = False
    malformed_json_rate: float = attrs.field(default=0.0, validator=_rate)
    task_failure_rate: float = attrs.field(default=0.0, validator=_rate)
    answer_delay: float = attrs.field(default=0.0, validator=_non_negative)
    query_error_rate: float = attrs.field(default=0.0, validator=_rate)
    bad_gateway_rate: float = attrs.field(default=0.0, validator=_rate)
    lost_answer_rate: float = attrs.field(default=0.0, validator=_rate)
    create_delay: float = attrs.field(default=0.0, validator=_non_negative)


class Clock:
    """Seconds on the event loop's monotonic clock, and their Unix-time equivalents.

    It reads ``time.monotonic`` until :meth:`bind` hands it the running loop's ``time``: an
    event loop with a virtual clock then drives task states too.
    """

    def __init__(self) -> None:
        self.bind(time.monotonic)

    def bind(self, now: Callable[[], float]) -> None:
        """Read time from ``now`` from here on."""
        self.now = now
        self._offset = time.time() - now()

    def wall(self, moment: float) -> float:
        """Unix seconds of a monotonic ``moment``."""
        return moment + self._offset

    def ms(self, moment: float) -> int:
        """Unix milliseconds of a monotonic ``moment``, as the wire spells timestamps."""
        return int(self.wall(moment) * 1000)


@attrs.frozen(kw_only=True)
class FakeFace:
    """A face an identify-face step found: its id and when it is visible (ms)."""

    face_id: str
    start_ms: int = 0
    end_ms: int = 5000


@attrs.frozen(kw_only=True)
class FaceSession:
    """An identify-face session: advanced lip-sync may only use these faces.

    ``identify_task_id`` is the apimodels identify-face task that made the session (None for the
    official, synchronous identify-face): the session is usable once that task has succeeded.
    """

    session_id: str
    dialect: Dialect
    faces: tuple[FakeFace, ...]
    video_url: str | None = None
    identify_task_id: str | None = None


@attrs.define(kw_only=True, eq=False, repr=False)
class FakeTask:
    """One task on the fake server, with its state computed from the clock on every read.

    ``dialect`` is ``"kling"`` (official format) or ``"apimodels"``; ``stage`` is
    ``"lip-sync"``, ``"identify-face"`` or ``"advanced-lip-sync"``; ``input`` is the submitted
    request JSON; ``model`` is the apimodels model name.  ``state`` uses the official words
    (``submitted``, ``processing``, ``succeed``, ``failed``); ``reason`` is the failure reason
    and ``video_url`` the result URL, each set only in its terminal state.  ``created_at`` and
    ``finished_at`` are Unix seconds (``finished_at`` is None until the task ends).
    """

    task_id: str
    dialect: Dialect
    stage: Stage
    input: Mapping[str, Any]
    callback_url: str | None = None
    model: str | None = None
    session: FaceSession | None = None
    clock: Clock
    born: float
    processing_at: float
    ends_at: float
    outcome: Outcome
    planned_reason: str | None = None
    result_url: str
    #: The last state a callback reported (the dispatcher sends only changes).
    notified: State | None = None

    def __repr__(self) -> str:
        return (
            f"FakeTask(task_id={self.task_id!r}, dialect={self.dialect!r}, "
            f"stage={self.stage!r}, state={self.state!r})"
        )

    @property
    def state(self) -> State:
        """The state now: submitted, processing, succeed or failed."""
        now = self.clock.now()
        if now >= self.ends_at:
            return self.outcome
        return "processing" if now >= self.processing_at else "submitted"

    @property
    def terminal(self) -> bool:
        """Whether the task has ended."""
        return self.clock.now() >= self.ends_at

    @property
    def reason(self) -> str | None:
        """The failure reason, once the task has failed."""
        return self.planned_reason if self.state == "failed" else None

    @property
    def video_url(self) -> str | None:
        """The result video's URL, once the task has succeeded (identify-face makes none)."""
        if self.stage == "identify-face" or self.state != "succeed":
            return None
        return self.result_url

    @property
    def created_at(self) -> float:
        """Unix seconds when the task was created."""
        return self.clock.wall(self.born)

    @property
    def finished_at(self) -> float | None:
        """Unix seconds when the task ended, or None while it runs."""
        return self.clock.wall(self.ends_at) if self.terminal else None

    def changed_at(self) -> float:
        """Monotonic time of the latest state change (the wire's ``updated_at``)."""
        now = self.clock.now()
        if now >= self.ends_at:
            return self.ends_at
        return self.processing_at if now >= self.processing_at else self.born


class TaskLimitReached(Exception):
    """A submit found the account's task limit full; nothing was created."""


def _ignore(task: FakeTask) -> None:
    pass


class Account:
    """All tasks and sessions of the one account the fake server serves, and its task limit.

    The limit counts tasks from submit until they end, across dialects (docs/protocol.md,
    Concurrency); a heap of end times keeps the count cheap for benchmarks with many tasks.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        rng: random.Random,
        ids: random.Random,
        duration: Duration,
        processing_after: float | None,
        task_limit: int | None,
        failure_rate: float,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self._ids = ids
        self._duration = duration
        self._processing_after = processing_after
        self.task_limit = task_limit
        #: Share of tasks that fail with a content-policy reason (``FaultPlan``).
        self.failure_rate = failure_rate
        #: What an official identify-face answer says it cost (None: it says nothing).
        self.identify_face_units: float | None = None
        self.base_url = ""
        self.tasks: dict[str, FakeTask] = {}
        self.sessions: dict[str, FaceSession] = {}
        #: Advanced lip-sync tasks by their ``external_task_id`` (unique per account).
        self.external_ids: dict[str, str] = {}
        self.max_running_seen = 0
        #: Tasks removed by :meth:`forget` (still counted as created).
        self.forgotten = 0
        #: List pages read, by page number (benchmarks and tests look at deep reads).
        self.list_pages: collections.Counter[int] = collections.Counter()
        #: List pages read, by the page size asked for.
        self.list_page_sizes: collections.Counter[int] = collections.Counter()
        self._running: set[str] = set()
        self._ends: list[tuple[float, str]] = []
        self._order: dict[tuple[Dialect, Stage], list[str]] = {}
        #: Called with each task created or forced to finish (the callback dispatcher listens).
        self.on_change: Callable[[FakeTask], None] = _ignore

    def running(self) -> int:
        """How many tasks are submitted or processing now."""
        now = self.clock.now()
        while self._ends and self._ends[0][0] <= now:
            self._running.discard(heapq.heappop(self._ends)[1])
        return len(self._running)

    def has_room(self) -> bool:
        """Whether one more task fits under the task limit."""
        return self.task_limit is None or self.running() < self.task_limit

    def create(
        self,
        *,
        dialect: Dialect,
        stage: Stage,
        body: Mapping[str, Any],
        callback_url: str | None = None,
        model: str | None = None,
        session: FaceSession | None = None,
        fail_reason: str | None = None,
    ) -> FakeTask:
        """Create a task now; ``fail_reason`` makes it fail (else the failure rate may).

        Raises :class:`TaskLimitReached` when the task limit is full.
        """
        if not self.has_room():
            raise TaskLimitReached
        total = self._duration(self.rng) if callable(self._duration) else self._duration
        total = max(0.0, float(total))
        half = total / 2 if self._processing_after is None else self._processing_after
        if fail_reason is None and self.failure_rate and self.rng.random() < self.failure_rate:
            fail_reason = CONTENT_POLICY_REASON
        task_id = self._new_task_id(dialect)
        now = self.clock.now()
        task = FakeTask(
            task_id=task_id,
            dialect=dialect,
            stage=stage,
            input=body,
            callback_url=callback_url,
            model=model,
            session=session,
            clock=self.clock,
            born=now,
            processing_at=now + min(max(0.0, half), total),
            ends_at=now + total,
            outcome="failed" if fail_reason else "succeed",
            planned_reason=fail_reason,
            result_url=f"{self.base_url}/videos/{task_id}.mp4",
        )
        self.tasks[task_id] = task
        self._order.setdefault((dialect, stage), []).append(task_id)
        self._running.add(task_id)
        heapq.heappush(self._ends, (task.ends_at, task_id))
        self.max_running_seen = max(self.max_running_seen, self.running())
        self.on_change(task)
        return task

    def finish(self, task_id: str, state: Outcome, reason: str | None) -> FakeTask:
        """End a task now with ``state`` (a failure gets ``reason`` or a generic one)."""
        if state not in ("succeed", "failed"):
            raise ValueError(f"state must be 'succeed' or 'failed', not {state!r}")
        task = self.tasks[task_id]
        now = self.clock.now()
        task.ends_at = min(task.ends_at, now)
        task.processing_at = min(task.processing_at, task.ends_at)
        task.outcome = state
        task.planned_reason = (reason or "task failed") if state == "failed" else None
        self._running.discard(task_id)
        self.on_change(task)
        return task

    def forget(self, task_id: str) -> FakeTask:
        """Remove a task as a server that purged it would: unknown to queries and lists.

        A running task stops counting against the task limit; its external id stays taken.
        """
        task = self.tasks.pop(task_id)
        self.forgotten += 1
        self._running.discard(task_id)
        for ids in self._order.values():
            if task_id in ids:
                ids.remove(task_id)
        return task

    def newest_first(self, dialect: Dialect, stage: Stage, skip: int, count: int) -> list[FakeTask]:
        """``count`` tasks of one dialect and stage after the ``skip`` newest, newest first.

        Only the page is touched: list queries stay cheap with many thousands of tasks.
        """
        ids = self._order.get((dialect, stage), [])
        stop = max(0, len(ids) - skip)
        return [self.tasks[i] for i in reversed(ids[max(0, stop - count) : stop])]

    def new_session(
        self,
        dialect: Dialect,
        face_count: int,
        *,
        video_url: str | None = None,
        identify_task_id: str | None = None,
    ) -> FaceSession:
        """Record a face session with ``face_count`` faces, each with a unique id."""
        faces = tuple(
            FakeFace(face_id=f"face_{self._token(8)}", start_ms=0, end_ms=5000)
            for _ in range(face_count)
        )
        session = FaceSession(
            session_id=f"session_{self._token(16)}",
            dialect=dialect,
            faces=faces,
            video_url=video_url,
            identify_task_id=identify_task_id,
        )
        self.sessions[session.session_id] = session
        return session

    def request_id(self) -> str:
        """A fresh request id, base64-like as the official samples show."""
        return self._token(22, string.ascii_letters + string.digits)

    def _new_task_id(self, dialect: Dialect) -> str:
        while True:
            if dialect == "kling":
                # 18-digit numeric strings, as in the official samples (docs/protocol.md, Envelope).
                task_id = str(self._ids.randrange(10**17, 10**18))
            else:
                # cuid-like ids, as in apimodels' samples ("clxxx...").
                task_id = "cl" + self._token(23)
            if task_id not in self.tasks:
                return task_id

    def _token(self, size: int, alphabet: str = string.ascii_lowercase + string.digits) -> str:
        return "".join(self._ids.choice(alphabet) for _ in range(size))
