"""KlingClient: one server, one session, one task-slot limiter; submit, get_task, run_batch.

Also the client's side of callbacks (:meth:`KlingClient.deliver_callback`, fed by
:mod:`kling_async.webhook`) and of downloads (:meth:`KlingClient.download`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
import weakref
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
from anyio.abc import TaskGroup

from ._auth import Credentials, credentials_for
from ._backoff import poll_delay
from ._batch import Batch, BatchIterator
from ._budget import Budget
from ._client_view import ClientView
from ._config import PollPolicy, RetryPolicy, check_count
from ._download import Downloader, file_name
from ._early import EarlyCallbacks
from ._errors import ValidationError
from ._http import normalize_base_url
from ._jobs import LipSyncJob
from ._options import ClientOptions
from ._requester import Requester
from ._results import JobResult, TaskSnapshot, TaskState
from ._signature import WebhookSecret, lower_headers
from ._transport import Timeouts, Transport
from .dialects import Dialect, Submit
from .dialects.kling import KlingDialect
from .events import Event

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack of **kwargs: Python 3.12

    from .journal import PostgresJournal

__all__ = [
    "APIMODELS_BASE_URL",
    "DMXAPI_BASE_URL",
    "OFFICIAL_BASE_URL",
    "KlingClient",
]

logger = logging.getLogger("kling_async")

#: The official API outside China (docs/protocol.md, Deployments; it replaced api.klingai.com).
OFFICIAL_BASE_URL = "https://api-singapore.klingai.com"
#: The DMXAPI gateway, which serves the official format under ``/kling``.
DMXAPI_BASE_URL = "https://www.dmxapi.cn"
#: apimodels.app (docs/protocol.md, apimodels.app).
APIMODELS_BASE_URL = "https://apimodels.app"

JobSource = Iterable[LipSyncJob] | AsyncIterable[LipSyncJob]

#: Task ids remembered after their tracking ended, so that a late or repeated callback about
#: one is answered 2xx (apimodels retries a callback for 30 minutes until it gets a 2xx).
RECENT_TASKS = 16384


class KlingClient:
    """A client for one Kling-speaking server.

    Build it with :meth:`kling`, :meth:`dmxapi` or :meth:`apimodels`, then use it as an async
    context manager::

        async with KlingClient.dmxapi(api_key=key) as client:
            async for result in client.run_batch(jobs):
                print(result.key, result.video_url or result.error)

    The options the constructors share are those of :class:`ClientOptions`.  Under another
    async library than asyncio (trio), ``async with`` raises :class:`RuntimeError` at once:
    aiohttp runs on asyncio only.
    """

    def __init__(
        self,
        *,
        dialect: Dialect,
        credentials: Credentials,
        base_url: str,
        max_in_flight: int = 20,
        poll: PollPolicy = PollPolicy(),
        retry: RetryPolicy = RetryPolicy(),
        session: aiohttp.ClientSession | None = None,
        timeouts: Timeouts = Timeouts(),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        max_downloads: int = 4,
        webhook_secret: str | Iterable[str] | None = None,
    ) -> None:
        check_count("max_in_flight", max_in_flight)
        check_count("max_downloads", max_downloads)
        if not isinstance(timeouts, Timeouts):
            raise ValidationError("timeouts", "must be a Timeouts")
        if not isinstance(poll, PollPolicy):
            raise ValidationError("poll", "must be a PollPolicy")
        if not isinstance(retry, RetryPolicy):
            raise ValidationError("retry", "must be a RetryPolicy")
        self.dialect = dialect
        #: The account's Webhook Secret, checked by :meth:`handle_callback` (None: unsigned).
        self.webhook_secret = WebhookSecret(webhook_secret) if webhook_secret is not None else None
        self.base_url = normalize_base_url(base_url)
        self.max_in_flight = max_in_flight
        self.poll = poll
        self.retry = retry
        self._rng = rng or random.Random()
        self._clock = clock
        transport = Transport(
            base_url=self.base_url,
            credentials=credentials,
            session=session,
            pool_size=max_in_flight + poll.max_concurrent_queries,
            timeouts=timeouts,
            clock=clock,
        )
        self._requester = Requester(transport, retry, self._rng)
        self._task_group: TaskGroup | None = None
        self._downloader = Downloader(
            transport, retry=retry, rng=self._rng, max_concurrent=max_downloads
        )
        # Batches that may still track tasks, for callbacks; finished ones are pruned.
        self._batches: weakref.WeakSet[Batch] = weakref.WeakSet()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Terminal callbacks about tasks not tracked yet (their submit's answer on its way).
        self._early = EarlyCallbacks()

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def kling(
        cls,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        api_key: str | None = None,
        base_url: str = OFFICIAL_BASE_URL,
        prefix: str = "",
        advanced: bool = False,
        gateway: bool | None = None,
        **options: Unpack[ClientOptions],
    ) -> KlingClient:
        """A client for the official Kling format, at the official API or any gateway.

        Authenticate with ``access_key`` and ``secret_key`` (a JWT is minted and renewed) or with
        a plain ``api_key`` sent as a Bearer token.  Given neither, the keys come from the
        environment: ``KLING_API_KEY``, else ``KLING_ACCESS_KEY`` and ``KLING_SECRET_KEY``
        (:class:`ValidationError` naming them when none is set).  ``prefix`` is the gateway's
        path prefix (``"/kling"`` at most gateways).  With ``advanced`` jobs use the official
        advanced lip-sync (identify-face, then advanced-lip-sync).  ``gateway``: whether
        ``base_url`` is a gateway, which may send refusals with HTTP 200, rather than the
        official API (default: when ``prefix`` is set); a cut-off 2xx answer then never proves
        that a task was created (README, "Guarantees").  ``options``: see
        :class:`ClientOptions`.
        """
        credentials = credentials_for(
            api_key=api_key,
            access_key=access_key,
            secret_key=secret_key,
            jwt_allowed=True,
            environ=os.environ,
        )
        dialect = KlingDialect(prefix=prefix, advanced=advanced, gateway=gateway)
        return cls(dialect=dialect, credentials=credentials, base_url=base_url, **options)

    @classmethod
    def dmxapi(
        cls,
        *,
        api_key: str | None = None,
        base_url: str = DMXAPI_BASE_URL,
        prefix: str = "/kling",
        advanced: bool = False,
        **options: Unpack[ClientOptions],
    ) -> KlingClient:
        """A client for the DMXAPI gateway: official format under ``/kling``, Bearer key.

        Without ``api_key`` the key is ``KLING_API_KEY`` from the environment.  ``advanced``
        is :meth:`kling`'s; ``options``: see :class:`ClientOptions`.
        """
        dialect = KlingDialect(prefix=prefix, advanced=advanced, gateway=True)
        return cls(dialect=dialect, credentials=_bearer(api_key), base_url=base_url, **options)

    @classmethod
    def apimodels(
        cls,
        *,
        api_key: str | None = None,
        base_url: str = APIMODELS_BASE_URL,
        **options: Unpack[ClientOptions],
    ) -> KlingClient:
        """A client for apimodels.app: advanced lip-sync in two tasks, audio jobs only.

        Without ``api_key`` the key is ``KLING_API_KEY`` from the environment.  ``options``:
        see :class:`ClientOptions`.
        """
        dialect = _apimodels_dialect()
        return cls(dialect=dialect, credentials=_bearer(api_key), base_url=base_url, **options)

    # -- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> KlingClient:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # aiohttp needs asyncio's loop; under trio it would fail later, deep inside a
            # request, with a message that says nothing about the cause.
            raise RuntimeError(
                "KlingClient runs on asyncio only (aiohttp needs it), and no asyncio event loop"
                " is running: under trio, use asyncio.run() or anyio.run(..., backend='asyncio')"
            ) from None
        if self._task_group is not None:
            raise RuntimeError("this KlingClient is already open")
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._task_group = self._task_group, None
        try:
            if group is not None:
                # Batches still running when the client closes are abandoned: cancel them.
                group.cancel_scope.cancel()
                # Batches hand their own errors to their consumers, so the group ends clean.
                # The caller's exception is not passed in: anyio would wrap it in an
                # ExceptionGroup, and a KlingError raised in the body must come out as itself.
                await group.__aexit__(None, None, None)
        finally:
            await self._requester.transport.aclose()

    async def aclose(self) -> None:
        """Close the client (what leaving ``async with`` does)."""
        await self.__aexit__(None, None, None)

    def __repr__(self) -> str:
        return (
            f"KlingClient(dialect={self.dialect.name!r}, base_url={self.base_url!r}, "
            f"max_in_flight={self.max_in_flight})"
        )

    # -- single tasks --------------------------------------------------------------------

    async def submit(self, job: LipSyncJob) -> TaskSnapshot:
        """Create the task that makes ``job``'s video and return its first snapshot.

        In a two-step dialect this first runs the identify-face step and waits for it; when that
        step fails, its (failed) snapshot is returned.  Errors are raised as :class:`KlingError`.
        """
        self.dialect.check_job(job)
        flow = self.dialect.flow(job)
        step = next(flow)
        while True:
            snapshot = await self.create_task(step)
            if step.final:
                flow.close()
                return snapshot
            if not snapshot.state.is_terminal:
                snapshot = await self._wait(step.stage, snapshot)
            try:
                step = flow.send(snapshot)
            except StopIteration as stop:
                result: TaskSnapshot = stop.value
                return result

    async def get_task(self, task_id: str, *, stage: str | None = None) -> TaskSnapshot:
        """Ask the server about one task (of the dialect's main stage unless ``stage`` is given)."""
        if not isinstance(task_id, str) or not task_id:
            raise ValidationError("task_id", "must be a non-empty string")
        stage = stage or self.dialect.default_stage
        request = self.dialect.query_request(stage, task_id)
        return await self._requester.call(
            request, lambda response: self.dialect.parse_query(stage, task_id, response)
        )

    async def create_task(
        self, step: Submit, *, retry_concurrency_limit: bool = True
    ) -> TaskSnapshot:
        """Send one submit step; retried only where the server certainly created nothing."""
        return await self._requester.call(
            step.request,
            lambda response: self.dialect.parse_submit(step.stage, response),
            retry_concurrency_limit=retry_concurrency_limit,
        )

    async def _wait(self, stage: str, snapshot: TaskSnapshot) -> TaskSnapshot:
        started = anyio.current_time()
        polls = 0
        while not snapshot.state.is_terminal:
            if anyio.current_time() - started > self.poll.timeout:
                return TaskSnapshot(task_id=snapshot.task_id, state=TaskState.TIMED_OUT)
            await anyio.sleep(poll_delay(self.poll, polls, self._rng))
            polls += 1
            snapshot = await self.get_task(snapshot.task_id, stage=stage)
        return snapshot

    # -- batches -------------------------------------------------------------------------

    def run_batch(
        self,
        jobs: JobSource,
        *,
        callback_url: str | None = None,
        journal: str | os.PathLike[str] | PostgresJournal | None = None,
        resubmit_unknown: bool = False,
        retry_failed: bool = False,
        download_to: str | os.PathLike[str] | None = None,
        budget: Budget | None = None,
        on_event: Callable[[Event], Any] | None = None,
    ) -> BatchIterator:
        """Run many jobs; iterate the result for one :class:`JobResult` per job, as they finish.

        ``jobs`` is any iterable or async iterable of :class:`LipSyncJob`, read lazily.  Results
        not yet taken by the consumer are bounded: the batch stops reading jobs while twice
        ``max_in_flight`` results wait.

        ``callback_url`` is passed to the dialect for every job (where your webhook receives the
        server's callbacks).

        ``journal`` (a file path: SQLite; or a ``postgresql://`` URL or a
        :class:`~kling_async.journal.PostgresJournal`, which several workers share) makes the
        batch resumable: rerun the same jobs with the same journal after a crash and

        * a job whose result the consumer already took is not reported again; a finished job
          whose result was not taken yet is reported from the journal, without a request;
        * a job whose task exists is tracked, never submitted again;
        * a job whose submit was in flight when the run stopped is looked up (by its external
          task id where the dialect has them, else provably by video and time: see the README's
          "Guarantees") and tracked when found, sent again when its external id is certainly
          absent; otherwise its result is a :class:`~kling_async.SubmitOutcomeUnknownError`
          naming the candidates, unless ``resubmit_unknown`` is True;
        * with ``retry_failed``, a job whose last result was a failure (a task that failed, or a
          request the server refused for good) is submitted again; a success never is, nor a
          job whose task may still run.  It needs a journal;
        * everything else is submitted.

        Keys must be unique within the batch (a job without ``key`` is keyed by its position,
        which only resumes correctly when the jobs come in the same order), and a key may not
        name a different job than the journal recorded, once that job may have created a task:
        both raise :class:`~kling_async.ValidationError` out of the loop.  See the README's
        "Resuming" section.

        ``download_to`` (a directory) saves each successful video there before its result is
        reported (:meth:`download`); ``JobResult.path`` says where.  A download that fails
        leaves the result ``ok`` (the video exists, its URL still works) with ``path`` None and
        ``error`` set to the :class:`~kling_async.DownloadError` (a folder that cannot be
        written at all is a :class:`~kling_async.ValidationError` before any request); with a
        journal such a result is not marked reported, so that a rerun saves its video.

        ``budget`` (a :class:`~kling_async.Budget`) caps what the batch spends, in units: each
        job's estimate (:func:`~kling_async.estimate`) is reserved before its first submit, and
        once the next reservation would pass the cap, submitting stops and the remaining jobs
        end with :class:`~kling_async.BudgetExceededError`.  What a task actually cost replaces
        its reservation when it ends; with a journal the spend carries over to reruns, and a
        PostgreSQL journal's workers share one budget (their reservations add up to it).

        ``on_event`` is called with what happens as it happens: typed records from
        :mod:`kling_async.events` (a plain or an ``async`` function; see that module).
        """
        batch = Batch(
            self._view(),
            jobs=jobs,
            callback_url=callback_url,
            journal=journal,
            resubmit_unknown=resubmit_unknown,
            retry_failed=retry_failed,
            download_to=download_to,
            budget=budget,
            on_event=on_event,
        )
        return self._start(batch)

    def track(self, task_ids: Iterable[str], *, stage: str | None = None) -> BatchIterator:
        """Follow tasks submitted elsewhere; yields a :class:`JobResult` per task id as it ends."""
        return self._start(Batch(self._view(), task_ids=list(task_ids), stage=stage))

    def _view(self) -> ClientView:
        """What a new batch needs of this client (the engine never sees the client itself)."""
        return ClientView(
            dialect=self.dialect,
            base_url=self.base_url,
            max_in_flight=self.max_in_flight,
            poll=self.poll,
            retry=self.retry,
            requester=self._requester,
            rng=self._rng,
            clock=self._clock,
            download=self.download,
        )

    def _start(self, batch: Batch) -> BatchIterator:
        if self._task_group is None:
            raise RuntimeError("open the client first: `async with client:`")
        batch.tracker.on_unwatch = self._remember
        batch.tracker.early = self._early.take
        self._batches.add(batch)
        return batch.start(self._task_group)

    # -- callbacks -----------------------------------------------------------------------

    def deliver_callback(self, snapshot: TaskSnapshot) -> bool:
        """Hand a callback's snapshot to every live batch that tracks its task.

        A terminal snapshot finishes the task at once; a non-terminal one changes nothing
        (polling goes on).  Repeated and out-of-order callbacks are harmless: a task that has
        ended ignores later news.  Returns True when the task is tracked now or was tracked
        recently by this client (the callback deserves a 2xx answer), False for a task this
        client knows nothing about.  A terminal snapshot of such a task is kept a while (at
        most 256 of them, for 5 minutes): its submit's answer may still be on its way, and the
        task ends with it once tracked.  :class:`kling_async.webhook.CallbackReceiver` calls
        this; call it yourself from any other web framework, and only with a callback that
        passed your checks (the URL's token, the signature): it is taken as the server's word.
        """
        known = False
        for batch in list(self._batches):
            if batch.finished:
                self._batches.discard(batch)
            elif batch.tracker.update(snapshot):
                known = True
        if known or snapshot.task_id in self._recent:
            return True
        self._early.keep(snapshot)
        return False

    def handle_callback(
        self, body: bytes, *, headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()
    ) -> bool:
        """Parse a callback body with this client's dialect and :meth:`deliver_callback` it.

        With a ``webhook_secret`` (``KlingClient(..., webhook_secret="whsec_...")``) the
        callback's ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` ``headers``
        (names in any case) are verified first: :class:`~kling_async.CallbackSignatureError`
        when they are missing, stale or wrong (answer 401), and nothing changes.  Raises
        :class:`~kling_async.MalformedResponseError` for a body that is not a callback.
        """
        if self.webhook_secret is not None:
            self.webhook_secret.verify(body, lower_headers(headers), now=self._clock())
        return self.deliver_callback(self.dialect.parse_callback(body))

    def _remember(self, task_id: str) -> None:
        recent = self._recent
        if task_id in recent:
            recent.move_to_end(task_id)
        else:  # (a new key goes to the end: no move, once per tracked task)
            recent[task_id] = None
            while len(recent) > RECENT_TASKS:
                recent.popitem(last=False)

    # -- downloads -----------------------------------------------------------------------

    async def download(
        self,
        result: JobResult | TaskSnapshot,
        directory: str | os.PathLike[str],
        *,
        filename: str | None = None,
    ) -> Path:
        """Save ``result``'s video in ``directory`` (created if missing); return the file's path.

        The file is named after the job's key (a :class:`TaskSnapshot`'s task id, or when the
        key has no usable character), made safe: no path separators, no ``..``, no control
        characters, at most 120 bytes, plus the video's extension.  ``filename`` overrides the
        name (made safe the same way).  An existing file is never overwritten: if it holds the
        same video (same size, same first 64 KiB) its path is returned without downloading,
        otherwise the new file gets a ``-1``, ``-2``... suffix.

        The video is streamed to a temporary file in ``directory`` and appears under its name
        only when complete and of the announced size; dropped connections resume with HTTP
        Range where the host allows.  The API key is never sent to the video's host.  At most
        ``max_downloads`` downloads run at once per client.  Raises
        :class:`~kling_async.DownloadError` when the video cannot be had (an expired URL, a
        size that never matches) and :class:`~kling_async.ValidationError` for a result with no
        video.
        """
        if not isinstance(result, (JobResult, TaskSnapshot)):
            raise ValidationError("result", "must be a JobResult or a TaskSnapshot")
        url = result.video_url
        if url is None:
            raise ValidationError("result", "has no video (the task did not succeed)")
        key = result.key if isinstance(result, JobResult) else None
        name = file_name(url, key=key, task_id=result.task_id, filename=filename)
        return await self._downloader.download(url, Path(directory), name)


def _bearer(api_key: str | None) -> Credentials:
    """A Bearer key: ``api_key``, else ``KLING_API_KEY`` from the environment."""
    return credentials_for(api_key=api_key, jwt_allowed=False, environ=os.environ)


def _apimodels_dialect() -> Dialect:
    # Imported here: clients of the official format never build apimodels' wire converters.
    from .dialects.apimodels import ApimodelsDialect

    return ApimodelsDialect()
