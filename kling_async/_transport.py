"""The only module that touches aiohttp's client: sends :class:`HttpRequest` records.

It owns (or borrows) one ``aiohttp.ClientSession`` with a sized connection pool and explicit
time-outs, builds absolute URLs that keep gateway prefixes, adds the ``Authorization`` header,
and maps aiohttp's exceptions onto the :class:`~kling_async.TransportError` tree.
:meth:`Transport.stream` fetches result videos from their (CDN) URLs, without credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import attrs

from ._auth import Credentials
from ._config import _count, _positive
from ._errors import (
    AuthenticationError,
    ConnectError,
    KlingError,
    MalformedResponseError,
    TransportError,
    TransportTimeout,
    error_from_response,
)
from ._http import HttpRequest, HttpResponse

__all__ = ["MAX_BODY_BYTES", "Stream", "Timeouts", "Transport"]

logger = logging.getLogger("kling_async")

#: Default headers of a caller's session that carry the caller's credentials.  Such a session
#: never fetches videos (see Transport.stream); Proxy-Authorization is for the proxy, so it stays.
_CREDENTIAL_HEADERS = ("Authorization", "Cookie")

#: Default largest API answer read into memory (``Timeouts.max_answer_bytes``): the largest
#: legitimate one, a list page of 500 tasks, is well under 1 MiB.
MAX_BODY_BYTES = 2 * 1024 * 1024


@attrs.frozen(kw_only=True)
class Timeouts:
    """Limits of one request: time-outs in seconds, and the largest API answer read.

    API calls are bounded by ``connect`` and ``total``: a server that stalls (never answers, or
    stops mid-answer) fails with :class:`~kling_async.TransportTimeout` after at most ``total``
    seconds.  ``read`` (the longest silence between two reads) applies to video downloads,
    which have no total limit.  Why not ``read`` on API calls too: an API answer is a small
    JSON body (bounded by ``max_answer_bytes``, normally a few KB that arrive at once), so
    ``total`` already bounds it, while aiohttp re-arms a read timer at every request and every
    chunk received (two more timers a request; at thousands of requests a second, a tenth of
    the client's CPU, benchmarks/README.md "Overhead").

    The total is generous because a submit may upload up to 5 MB of base64 audio.

    An API answer longer than ``max_answer_bytes`` (default 2 MiB, twice and more the largest
    legitimate one) is refused as a :class:`~kling_async.MalformedResponseError`: one declared
    longer before its body is read, a chunked one as soon as it passes the cap.  Videos are not
    bounded by it.
    """

    connect: float = attrs.field(default=15.0, validator=_positive)
    read: float = attrs.field(default=60.0, validator=_positive)
    total: float = attrs.field(default=180.0, validator=_positive)
    max_answer_bytes: int = attrs.field(default=MAX_BODY_BYTES, validator=_count)

    def for_api(self) -> aiohttp.ClientTimeout:
        """An API call's limits for aiohttp: ``connect`` and ``total``, no per-read timer."""
        return aiohttp.ClientTimeout(
            total=self.total, sock_connect=self.connect, connect=self.connect
        )

    def for_download(self) -> aiohttp.ClientTimeout:
        """The limits of a download as aiohttp takes them: ``connect`` and ``read``, no total.

        A video may take long to arrive on a slow link: no total limit, but the same limits on
        connecting and between reads, so a stalled download still fails.
        """
        return aiohttp.ClientTimeout(
            total=None, connect=self.connect, sock_connect=self.connect, sock_read=self.read
        )


class Transport:
    """Sends requests to one server with one session.

    A caller-provided ``session`` is used as it is and never closed here; otherwise the
    transport opens its own on first use with a pool of ``pool_size`` connections and closes it
    in :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        base_url: str,
        credentials: Credentials,
        session: aiohttp.ClientSession | None = None,
        pool_size: int = 32,
        timeouts: Timeouts = Timeouts(),
        user_agent: str = "kling-async",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url
        self._credentials = credentials
        self._session = session
        self._owns_session = session is None
        self._pool_size = pool_size
        self._timeout = timeouts.for_api()
        self._cap = timeouts.max_answer_bytes
        self._stream_timeout = timeouts.for_download()
        self._user_agent = user_agent
        self._clock = clock
        # Built once and reused while the Authorization value stays the same (always, for a
        # static key; until the next mint for a JWT): aiohttp copies headers into its own
        # multidict, never mutating ours.
        self._authorization = ""
        self._headers: dict[str, str] = {}
        self._plain_session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session in use, opened on first access when the transport owns it."""
        if self._session is None:
            self._session = self._open_session()
        return self._session

    def _open_session(self, *, trust_env: bool = False) -> aiohttp.ClientSession:
        """A session of this transport's own, with a pool of ``pool_size`` connections."""
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=self._pool_size)
        return aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, raise_for_status=False, trust_env=trust_env
        )

    async def aclose(self) -> None:
        """Close the session if this transport opened it (and the one opened for videos)."""
        if self._plain_session is not None:
            plain, self._plain_session = self._plain_session, None
            await plain.close()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _video_session(self) -> aiohttp.ClientSession:
        """The session that fetches videos: ours, or a caller's that carries no credentials.

        aiohttp adds a session's default headers and ``auth`` to every request, and offers no
        way to leave them out of one: a caller's session set up with its own ``Authorization``
        (for another API, say) would send it to every video host.  Videos then travel through a
        plain session of this transport's own, which keeps the caller's ``trust_env``.
        """
        session = self.session
        if self._owns_session or not _carries_credentials(session):
            return session
        if self._plain_session is None:
            self._plain_session = self._open_session(trust_env=session.trust_env)
        return self._plain_session

    async def send(self, request: HttpRequest) -> HttpResponse:
        """Send ``request`` and return the answer, whatever its status.

        A 401 that a fresh token may cure (1003, 1004, "signature invalid") is retried once after
        :meth:`Credentials.refresh`: nothing was created, so this cannot pay twice.
        """
        # Both attempts in this one coroutine, and the body read inline when its length is
        # declared: a coroutine less per request (each one costs about a microsecond, and a
        # batch makes thousands of requests a second; benchmarks/README.md, "Overhead").
        url = request.url(self.base_url)
        retried = False
        while True:
            headers = self._request_headers()
            started = time.monotonic()
            try:
                async with self.session.request(
                    request.method, url, json=request.json, headers=headers, timeout=self._timeout
                ) as answer:
                    declared = answer.content_length
                    if declared is not None and declared <= self._cap:
                        body = await answer.read()
                    else:
                        body = await _read_bounded(answer, self._cap)
                    # aiohttp's headers are a case-insensitive multidict already: looked up by a
                    # lower-case name they answer as HttpResponse promises, without a copy.
                    response = HttpResponse(status=answer.status, body=body, headers=answer.headers)
            except KlingError:
                raise
            except aiohttp.ClientConnectorError as exc:
                raise ConnectError(f"cannot connect to {_origin(url)}: {exc.os_error}") from None
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                raise TransportTimeout(
                    f"{request.method} {request.path}: no answer within the time-out"
                ) from None
            except aiohttp.ClientError as exc:
                raise TransportError(
                    f"{request.method} {request.path}: {type(exc).__name__}"
                ) from None
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s %s -> %d in %.3f s",
                    request.method,
                    request.path,
                    response.status,
                    time.monotonic() - started,
                )
            if (
                retried
                or response.status != 401
                or not self._token_refused(response)
                or not self._credentials.refresh()
            ):
                return response
            logger.debug("token refused; retrying once with a fresh one")
            retried = True

    @staticmethod
    def _token_refused(response: HttpResponse) -> bool:
        try:
            error = error_from_response(response.status, response.json())
        except MalformedResponseError:
            return False
        return isinstance(error, AuthenticationError) and error.token_expired

    def _request_headers(self) -> dict[str, str]:
        authorization = self._credentials.authorization(self._clock())
        if authorization != self._authorization:
            self._authorization = authorization
            self._headers = {
                "Authorization": authorization,
                "Accept": "application/json",
                "User-Agent": self._user_agent,
            }
        return self._headers

    @contextlib.asynccontextmanager
    async def stream(
        self, url: str, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Stream]:
        """GET an absolute ``url`` on any host and hand over the answer while it arrives.

        No ``Authorization`` header is ever sent: result videos live on other hosts (CDNs) than
        the API, and the key must not leak to them (nor a caller's session's own credentials:
        see :meth:`_video_session`).  ``Accept-Encoding: identity`` asks for the
        bytes as stored, so that sizes and byte ranges refer to the file itself.
        """
        sent = {"User-Agent": self._user_agent, "Accept-Encoding": "identity", **(headers or {})}
        where = _origin(url)
        try:
            answer = await self._video_session().get(
                url, headers=sent, timeout=self._stream_timeout
            )
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc.os_error}") from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise TransportTimeout(f"GET {where}: no answer within the time-out") from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"GET {where}: {type(exc).__name__}") from None
        try:
            yield Stream(answer, where)
        finally:
            # An unfinished body leaves the connection unusable; aiohttp then closes it.
            answer.release()


class Stream:
    """An answer whose body is still arriving: status, headers (lower-case names), chunks."""

    def __init__(self, answer: aiohttp.ClientResponse, where: str) -> None:
        self._answer = answer
        self._where = where
        self.status = answer.status
        self.headers: Mapping[str, str] = {k.lower(): v for k, v in answer.headers.items()}

    async def read(self, size: int = 256 * 1024) -> bytes:
        """The next chunk of at most ``size`` bytes; ``b""`` once the body is complete.

        A body cut short (connection dropped, declared length not reached) raises
        :class:`TransportError`; a stalled one :class:`TransportTimeout`.
        """
        try:
            return await self._answer.content.read(size)
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise TransportTimeout(f"GET {self._where}: the body stalled") from None
        except aiohttp.ClientError as exc:
            raise TransportError(
                f"GET {self._where}: body cut short ({type(exc).__name__})"
            ) from None


async def _read_bounded(answer: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body of an answer of unknown length, or the error of one longer than ``cap``.

    Read a piece at a time and refused as soon as it passes the cap (leaving the rest unread:
    the connection is then closed, not reused).
    """
    declared = answer.content_length
    if declared is not None and declared > cap:
        raise MalformedResponseError(
            f"answer of {declared} bytes exceeds the {cap}-byte cap", status=answer.status
        )
    if declared is not None:
        return await answer.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise MalformedResponseError(
                f"answer larger than the {cap}-byte cap", status=answer.status
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _carries_credentials(session: aiohttp.ClientSession) -> bool:
    return session.auth is not None or any(name in session.headers for name in _CREDENTIAL_HEADERS)


def _origin(url: str) -> str:
    # Only scheme and host: a URL path may carry task ids, never secrets, but keep messages short.
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
