"""What goes on the wire: envelopes of both dialects, refusals, and the broken answers of faults.

The official envelope is ``{code, message, request_id, data}`` with ``code == 0`` for success;
apimodels answers ``{code: 200, msg: "success", data}`` and errors ``{code: <http>, msg}``
(docs/protocol.md, Envelope and apimodels.app errors).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "Refusal",
    "apimodels_ok",
    "html_500",
    "html_502",
    "official_ok",
    "read_json",
    "refusal_response",
    "truncated_json",
]

WireDialect = Literal["kling", "apimodels"]

# docs/protocol.md, Business codes: the HTTP status each code travels with.
OFFICIAL_STATUS: dict[int, int] = {
    **dict.fromkeys((1000, 1001, 1002, 1003, 1004), 401),
    **dict.fromkeys((1100, 1101, 1102), 429),
    1103: 403,
    **dict.fromkeys((1200, 1201, 1300, 1301), 400),
    **dict.fromkeys((1202, 1203), 404),
    **dict.fromkeys((1302, 1303, 1304), 429),
    5000: 500,
    5001: 503,
    5002: 504,
}

OFFICIAL_MESSAGES: dict[int, str] = {
    1000: "authentication failed",
    1001: "authorization header is empty",
    1002: "authorization header is invalid",
    1003: "token is not yet valid",
    1004: "token has expired",
    1100: "account exception",
    1101: "account in arrears",
    1102: "resource pack used up or expired",
    1103: "no permission for this API or model",
    1200: "invalid request",
    1201: "invalid parameter",
    1202: "invalid method",
    1203: "resource not found",
    1300: "platform policy triggered",
    1301: "content-security policy triggered",
    1302: "requests too fast",
    1303: "concurrent tasks over the resource pack limit",
    1304: "IP whitelist policy",
    5000: "internal error",
    5001: "service temporarily unavailable",
    5002: "internal timeout",
}

# apimodels speaks HTTP numbers only (docs/protocol.md, apimodels.app errors); the official code
# an account problem would have elsewhere maps onto these.
APIMODELS_EQUIVALENT: dict[int, int] = {
    **dict.fromkeys((1000, 1001, 1002, 1003, 1004), 401),
    **dict.fromkeys((1100, 1101, 1102), 402),
    **dict.fromkeys((1103, 1304), 403),
    **dict.fromkeys((1200, 1201, 1202, 1300, 1301), 400),
    1203: 404,
    **dict.fromkeys((1302, 1303), 429),
    5000: 500,
    5001: 503,
    5002: 504,
}

APIMODELS_MESSAGES: dict[int, str] = {
    400: "bad request",
    401: "invalid api key",
    402: "insufficient balance",
    403: "forbidden",
    404: "task not found",
    429: "too many concurrent tasks",
    500: "internal server error",
    503: "service unavailable",
    504: "gateway timeout",
}


class Refusal(Exception):
    """A request the server turns down with a body ``code`` (official code or apimodels HTTP).

    ``status`` defaults to the code's documented HTTP status; ``as_http_200`` sends HTTP 200
    instead (the gateway quirk).
    """

    def __init__(
        self,
        code: int,
        message: str | None = None,
        *,
        status: int | None = None,
        as_http_200: bool = False,
    ) -> None:
        self.code = code
        self.message = message
        self.status = status
        self.as_http_200 = as_http_200
        super().__init__(code, message)

    def for_apimodels(self) -> Refusal:
        """The same refusal in apimodels' terms (an official code becomes its HTTP number)."""
        code = APIMODELS_EQUIVALENT.get(self.code, self.code)
        return Refusal(code, self.message, status=self.status, as_http_200=self.as_http_200)


def refusal_response(
    refusal: Refusal, dialect: WireDialect, *, request_id: str, as_http_200: bool
) -> web.Response:
    """Render a refusal in ``dialect``'s error envelope."""
    if dialect == "apimodels":
        refusal = refusal.for_apimodels()
        message = refusal.message or APIMODELS_MESSAGES.get(refusal.code, "request failed")
        body: dict[str, Any] = {"code": refusal.code, "msg": message}
    else:
        message = refusal.message or OFFICIAL_MESSAGES.get(refusal.code, "request failed")
        body = {"code": refusal.code, "message": message, "request_id": request_id, "data": None}
    status = refusal.status or OFFICIAL_STATUS.get(refusal.code) or _http_or_400(refusal.code)
    if as_http_200 or refusal.as_http_200:
        status = 200
    return web.json_response(body, status=status)


def _http_or_400(code: int) -> int:
    return code if 400 <= code < 600 else 400


def official_ok(data: object, request_id: str) -> web.Response:
    """An official-format success envelope."""
    body = {"code": 0, "message": "SUCCEED", "request_id": request_id, "data": data}
    return web.json_response(body)


def apimodels_ok(data: object) -> web.Response:
    """An apimodels success envelope."""
    return web.json_response({"code": 200, "msg": "success", "data": data})


def html_500() -> web.Response:
    """The HTML error page a crashing gateway sends."""
    page = "<html><head><title>500 Internal Server Error</title></head><body>"
    page += "<h1>500 Internal Server Error</h1></body></html>"
    return web.Response(status=500, text=page, content_type="text/html")


def html_502() -> web.Response:
    """The HTML page a proxy sends when it could not reach the service behind it."""
    page = "<html><head><title>502 Bad Gateway</title></head><body>"
    page += "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
    return web.Response(status=502, text=page, content_type="text/html")


def truncated_json(body: bytes) -> web.Response:
    """HTTP 200 carrying the first half of a JSON answer (an answer cut off in transit)."""
    return web.Response(
        status=200, body=body[: max(1, len(body) // 2)], content_type="application/json"
    )


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 1200 refusal.

    The body size is bounded by the application's ``client_max_size`` (aiohttp answers 413).
    """
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise Refusal(1200, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refusal(1200, "request body must be a JSON object")
    return body
