"""The :class:`FakeKlingServer` object: options, lifecycle and the controls tests use."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType

from aiohttp import web

from .._signature import WebhookSecret
from . import _apimodels, _official
from ._apimodels import ApimodelsRoutes
from ._callbacks import CallbackDispatcher
from ._gate import Credentials, Gate, Handler
from ._official import OfficialRoutes
from ._state import Account, Clock, Duration, FaceSession, FakeTask, FaultPlan, Outcome
from ._videos import VideoRoute
from ._wire import Refusal, refusal_response

__all__ = ["ROUTES", "SANDBOX_API_KEY", "SANDBOX_JWT_CREDENTIALS", "FakeKlingServer"]

#: The Bearer key the fake accepts by default (official format and apimodels).
SANDBOX_API_KEY = "sk-sandbox"
#: The access key -> secret key pair the fake accepts as HS256 JWTs by default.
SANDBOX_JWT_CREDENTIALS: Mapping[str, str] = MappingProxyType(
    {"ak-sandbox": "sk-sandbox-secret-for-hs256-tokens"}
)
#: Route names, as counted in :attr:`FakeKlingServer.requests` and taken by ``script``.
ROUTES = (
    "submit",
    "query",
    "list",
    "identify-face",
    "advanced-submit",
    "advanced-query",
    "advanced-list",
    "apimodels-submit",
    "apimodels-query",
)
#: The default fault plan: nothing injected.
NO_FAULTS = FaultPlan()
# Bodies are bounded: 5 MB of audio is about 6.7 MB as base64, plus the JSON around it.
MAX_BODY_BYTES = 8 * 1024 * 1024
# How long close() lets requests in flight finish (a submit sleeping in answer_delay is cut).
SHUTDOWN_SECONDS = 0.25


def _prefix(value: str) -> str:
    prefix = value.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"a prefix must be empty or start with '/', not {value!r}")
    return prefix


class FakeKlingServer:
    """A real aiohttp server on loopback that speaks every Kling dialect, for tests.

    See the :mod:`kling_async.testing` docstring for what it serves and how to use it.  All
    options are keyword-only; ``start()`` / ``close()`` (or ``async with``) run it.
    ``processing_after`` defaults to half of each task's duration; ``port=0`` picks a free
    port; ``callback_timeout`` bounds each callback delivery, in seconds.  With
    ``webhook_secret`` (``"whsec_..."``) every callback is signed as Kling signs them.
    ``identify_face_units``: what an official identify-face answer says the call cost
    (``final_unit_deduction``); by default it says nothing, as the documented answer.
    """

    def __init__(
        self,
        *,
        task_duration: Duration = 0.05,
        processing_after: float | None = None,
        task_limit: int | None = None,
        api_keys: Iterable[str] = (SANDBOX_API_KEY,),
        jwt_credentials: Mapping[str, str] = SANDBOX_JWT_CREDENTIALS,
        prefixes: Iterable[str] = ("", "/kling"),
        faults: FaultPlan = NO_FAULTS,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        callback_timeout: float = 2.0,
        webhook_secret: str | None = None,
        identify_face_units: float | None = None,
    ) -> None:
        if task_limit is not None and task_limit < 0:
            raise ValueError(
                f"task_limit must be at least 0 (no limit) or None, not {task_limit!r}"
            )
        task_limit = task_limit or None  # 0 means no limit, as `fake-server --task-limit 0` does
        if processing_after is not None and processing_after < 0:
            raise ValueError(f"processing_after must be at least 0, not {processing_after!r}")
        self.host = host
        self._port = port
        self._prefixes = tuple(dict.fromkeys(_prefix(p) for p in prefixes))
        self._callback_timeout = callback_timeout
        self._secret = WebhookSecret(webhook_secret) if webhook_secret is not None else None
        self._clock = Clock()
        rng = random.Random(seed)
        self._account = Account(
            clock=self._clock,
            rng=rng,
            ids=random.Random(f"ids-{seed}"),
            duration=task_duration,
            processing_after=processing_after,
            task_limit=task_limit,
            failure_rate=faults.task_failure_rate,
        )
        self._account.identify_face_units = identify_face_units
        self._gate = Gate(
            credentials=Credentials(api_keys, jwt_credentials),
            rng=rng,
            request_id=self._account.request_id,
            faults=faults,
        )
        self._dispatcher: CallbackDispatcher | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    def __repr__(self) -> str:
        where = self._url or "not started"
        return f"<FakeKlingServer {where} tasks={len(self._account.tasks)}>"

    @property
    def faults(self) -> FaultPlan:
        """The faults in force; assign a new :class:`FaultPlan` to change them mid-run."""
        return self._gate.faults

    @faults.setter
    def faults(self, plan: FaultPlan) -> None:
        self._gate.faults = plan
        self._account.failure_rate = plan.task_failure_rate

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the FakeKlingServer is not started")
        return self._url

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests by route name (see ``ROUTES``), and tallies of outcomes.

        ``"download"`` counts video downloads, ``"rejected"`` error answers, ``"limited"``
        task-limit refusals (also counted as rejected) and ``"faulted"`` injected faults.
        """
        return self._gate.requests

    @property
    def faults_hit(self) -> collections.Counter[str]:
        """Injected faults that struck, by kind (a :class:`FaultPlan` knob without ``_rate``).

        The kinds: ``http_500``, ``bad_gateway``, ``query_error``, ``malformed_json`` and
        ``lost_answer``.  Tasks failed by ``task_failure_rate`` are those whose ``reason`` is
        :data:`CONTENT_POLICY_REASON`.
        """
        return self._gate.faults_hit

    @property
    def list_pages(self) -> collections.Counter[int]:
        """List-query pages read, by page number (all stages and dialects together)."""
        return self._account.list_pages

    @property
    def list_page_sizes(self) -> collections.Counter[int]:
        """List-query pages read, by the page size asked for (``pageSize``)."""
        return self._account.list_page_sizes

    @property
    def tasks(self) -> dict[str, FakeTask]:
        """Every task created, by task id."""
        return self._account.tasks

    @property
    def sessions(self) -> dict[str, FaceSession]:
        """Every identify-face session made, by session id (official and apimodels alike)."""
        return self._account.sessions

    @property
    def tasks_created(self) -> int:
        """How many tasks were created in all."""
        return len(self._account.tasks) + self._account.forgotten

    @property
    def running(self) -> int:
        """How many tasks are submitted or processing now."""
        return self._account.running()

    @property
    def max_running_seen(self) -> int:
        """The most tasks that were submitted or processing at once."""
        return self._account.max_running_seen

    @property
    def callbacks_sent(self) -> list[tuple[str, int | str]]:
        """Callbacks delivered: ``(url, HTTP status)`` or ``(url, exception class name)``."""
        return self._dispatcher.sent if self._dispatcher else []

    def script(
        self,
        route: str,
        status: int = 429,
        code: int = 1303,
        message: str | None = None,
        times: int = 1,
        as_http_200: bool = False,
    ) -> None:
        """Answer the next ``times`` requests on ``route`` with this error, before acting.

        ``code`` is the official business code; on apimodels routes it becomes apimodels'
        HTTP-number code (1303 -> 429, 1101 -> 402...), unless it is one already.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {', '.join(ROUTES)}")
        refusal = Refusal(code, message, status=status, as_http_200=as_http_200)
        self._gate.script(route, refusal, times)

    def set_account_error(self, code: int | None) -> None:
        """Answer every later API request with business ``code`` (None clears it)."""
        self._gate.account_error = code

    def finish(
        self, task_id: str, state: Outcome = "succeed", reason: str | None = None
    ) -> FakeTask:
        """End a task now as ``"succeed"`` or ``"failed"`` (with ``reason``)."""
        return self._account.finish(task_id, state, reason)

    def forget(self, task_id: str) -> FakeTask:
        """Remove a task as if the server had purged it.

        Queries answer 1203 "task not found", list queries leave it out, and a running task no
        longer counts against the task limit (its external id stays taken).
        """
        return self._account.forget(task_id)

    async def start(self) -> None:
        """Bind the port and serve until :meth:`close`."""
        if self._runner is not None:
            raise RuntimeError("the FakeKlingServer is already started")
        loop = asyncio.get_running_loop()
        self._clock.bind(loop.time)
        dispatcher = CallbackDispatcher(
            clock=self._clock,
            render=self._callback_body,
            timeout=self._callback_timeout,
            secret=self._secret,
        )
        self._dispatcher = dispatcher
        self._account.on_change = dispatcher.watch
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._json_errors])
        OfficialRoutes(account=self._account, gate=self._gate).add_to(app, self._prefixes)
        ApimodelsRoutes(account=self._account, gate=self._gate).add_to(app)
        VideoRoute(account=self._account, requests=self._gate.requests).add_to(app)
        # No access log: paths are harmless, but a fake for tests should stay quiet.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            # A deep accept queue: a batch opens up to max_in_flight connections at once, and
            # past the default 128 the kernel drops SYNs and the client waits out a retransmit.
            site = web.TCPSite(runner, self.host, self._port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{port}"
        self._account.base_url = self._url

    async def close(self) -> None:
        """Stop serving: cancel callback delivery, close its session and the listening site."""
        if self._dispatcher is not None:
            await self._dispatcher.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeKlingServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """An unknown path or method gets the official JSON error envelope, not aiohttp's text.

        Clients read an error's reason from the body (code 1202, "invalid method"), as the real
        API answers them; the video route's own 404 (a missing video) stays as it is.
        """
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            if request.match_info.http_exception is None:
                raise
            self._gate.requests["unknown-path"] += 1
            refusal = Refusal(1202, f"no such method or path: {request.method}", status=exc.status)
            request_id = self._account.request_id()
            return refusal_response(refusal, "kling", request_id=request_id, as_http_200=False)

    def _callback_body(self, task: FakeTask) -> object:
        if task.dialect == "kling":
            return _official.render_task(task, self._account)
        return _apimodels.callback_body(task, self._account)
