"""Everything a request passes before its route acts: counting, scripts, faults, auth, account.

Order (each step may answer instead of the route): count the route; a scripted error
(:meth:`Gate.script`); an HTML 500 (``http_500_rate``) or a proxy's 502
(``bad_gateway_rate``, the request never reached the service); authentication; the account error
(:meth:`Gate.account_error`); for queries a 5000 (``query_error_rate``) and, from a gateway
that sends refusals with HTTP 200 (``errors_as_http_200``), a submit's truncated refusal
(``malformed_json_rate``, nothing created).  Then the route runs; its answer may still be
truncated afterwards (``malformed_json_rate`` otherwise; a submit's once its task exists,
``lost_answer_rate``).
"""

from __future__ import annotations

import collections
import random
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal

import jwt
from aiohttp import web

from ._state import FaultPlan, TaskLimitReached
from ._wire import Refusal, WireDialect, html_500, html_502, refusal_response, truncated_json

__all__ = ["CREATES_TASK", "Credentials", "Gate", "Handler", "Kind", "RouteHandler"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A route's own handler: the request and the request id its answer quotes.
RouteHandler = Callable[[web.Request, str], Awaitable[web.Response]]
#: "submit" routes create something (faults strike before acting), "query" routes only read.
Kind = Literal["submit", "query"]

#: Routes whose requests create a task (identify-face answers at once and creates none).
CREATES_TASK = frozenset({"submit", "advanced-submit", "apimodels-submit"})

# PyJWT checks exp and nbf with this much slack, as the official server tolerates clock skew.
JWT_LEEWAY_SECONDS = 5


class Credentials:
    """The Bearer keys and JWT access/secret key pairs the fake account accepts.

    Refusals name no key: secrets never appear in answers or logs.
    """

    def __init__(self, api_keys: Iterable[str], jwt_credentials: Mapping[str, str]) -> None:
        self._keys = frozenset(api_keys)
        self._secrets = dict(jwt_credentials)

    def check(self, header: str | None, *, allow_jwt: bool) -> None:
        """Raise a :class:`Refusal` (1000-1004, HTTP 401) unless ``header`` is acceptable."""
        if not header or not header.strip():
            raise Refusal(1001)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refusal(1002)
        if token in self._keys:
            return
        if not allow_jwt or token.count(".") != 2:
            raise Refusal(1000)
        self._check_jwt(token)

    def _check_jwt(self, token: str) -> None:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Refusal(1000) from None
        issuer = claims.get("iss")
        secret = self._secrets.get(issuer) if isinstance(issuer, str) else None
        if secret is None:
            raise Refusal(1000)
        try:
            with warnings.catch_warnings():
                # A short sandbox secret is fine here; its warning must not break -W error runs.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                jwt.decode(
                    token,
                    secret,
                    algorithms=["HS256"],
                    issuer=issuer,
                    leeway=JWT_LEEWAY_SECONDS,
                    options={"require": ["exp", "nbf", "iss"]},
                )
        except jwt.ExpiredSignatureError:
            raise Refusal(1004) from None
        except jwt.ImmatureSignatureError:
            raise Refusal(1003) from None
        except jwt.InvalidSignatureError:
            raise Refusal(1000, "signature invalid") from None
        except jwt.PyJWTError:
            raise Refusal(1000) from None


class Gate:
    """Wraps route handlers with the steps listed in the module docstring."""

    def __init__(
        self,
        *,
        credentials: Credentials,
        rng: random.Random,
        request_id: Callable[[], str],
        faults: FaultPlan,
    ) -> None:
        self.credentials = credentials
        self.requests: collections.Counter[str] = collections.Counter()
        #: Injected faults that struck, by FaultPlan knob (``http_500_rate``...).
        self.faults_hit: collections.Counter[str] = collections.Counter()
        self.account_error: int | None = None
        self._rng = rng
        self._request_id = request_id
        #: The faults in force; routes read it on every request, so it may change mid-run.
        self.faults = faults
        self._scripts: dict[str, collections.deque[Refusal]] = {}

    def script(self, route: str, refusal: Refusal, times: int) -> None:
        """Answer the next ``times`` requests on ``route`` with ``refusal``, before acting."""
        self._scripts.setdefault(route, collections.deque()).extend([refusal] * times)

    def guard(self, route: str, dialect: WireDialect, kind: Kind, handler: RouteHandler) -> Handler:
        """``handler`` behind the gate, counted under ``route``."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            self.requests[route] += 1
            request_id = self._request_id()
            try:
                early = self._before(route, dialect, kind, request, request_id)
                if early is not None:
                    self.requests["faulted"] += 1
                    return early
                try:
                    response = await handler(request, request_id)
                except TaskLimitReached:
                    # The task limit holds from submit until a task ends (docs/protocol.md,
                    # Concurrency); apimodels words it as HTTP 429 "too many concurrent tasks".
                    self.requests["limited"] += 1
                    raise Refusal(1303) from None
            except Refusal as refusal:
                self.requests["rejected"] += 1
                return refusal_response(
                    refusal,
                    dialect,
                    request_id=request_id,
                    as_http_200=self.faults.errors_as_http_200,
                )
            # After acting: the request was answered (a submit's task exists), then its answer
            # broke in transit (a server that sends every refusal with its own status can only
            # fail a 2xx so; a gateway's cut-off refusal is _before's).
            lost = route in CREATES_TASK and self._strikes(
                self.faults.lost_answer_rate, "lost_answer"
            )
            malformed = kind == "query" or not self.faults.errors_as_http_200
            if lost or (
                malformed and self._strikes(self.faults.malformed_json_rate, "malformed_json")
            ):
                self.requests["faulted"] += 1
                body = response.body
                return truncated_json(body if isinstance(body, bytes) else b"{}")
            return response

        return guarded

    def _before(
        self, route: str, dialect: WireDialect, kind: Kind, request: web.Request, request_id: str
    ) -> web.Response | None:
        queue = self._scripts.get(route)
        if queue:
            raise queue.popleft()
        if self._strikes(self.faults.http_500_rate, "http_500"):
            return html_500()
        if route in CREATES_TASK and self._strikes(self.faults.bad_gateway_rate, "bad_gateway"):
            return html_502()
        self.credentials.check(request.headers.get("Authorization"), allow_jwt=dialect == "kling")
        if self.account_error is not None:
            raise Refusal(self.account_error)
        if kind == "query" and self._strikes(self.faults.query_error_rate, "query_error"):
            return refusal_response(
                Refusal(5000), dialect, request_id=request_id, as_http_200=False
            )
        if (
            kind == "submit"
            and self.faults.errors_as_http_200
            and self._strikes(self.faults.malformed_json_rate, "malformed_json")
        ):
            # A gateway's refusal, sent with HTTP 200, broken in transit: nothing was created.
            return truncated_json(b'{"code": 1303, "message": "over the task limit", "data": nu')
        return None

    def _strikes(self, rate: float, fault: str) -> bool:
        # Draw only for knobs that are on: with every fault off, the generator serves task
        # durations and failures alone, so those stay the same from run to run.
        if rate > 0.0 and self._rng.random() < rate:
            self.faults_hit[fault] += 1
            return True
        return False
