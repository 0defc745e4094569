"""A fake Kling server for tests: a real aiohttp server on loopback that speaks every dialect.

Point a :class:`~kling_async.KlingClient` (or any HTTP client) at it instead of the paid API::

    from kling_async.testing import FakeKlingServer, FaultPlan

    async with FakeKlingServer(task_duration=0.05, task_limit=5) as server:
        client = KlingClient.kling(api_key="sk-sandbox", base_url=server.url, prefix="/kling")
        ...
        assert server.max_running_seen <= 5

It serves, on ``server.url``:

* the official format (docs/protocol.md, Official format) under each of ``prefixes`` (default
  ``""`` and ``"/kling"``, the DMXAPI layout): lip-sync submit, query by id and paged list;
  identify-face (synchronous) and advanced lip-sync with its query and list;
* apimodels.app's ``/api/v1/audio/generations`` (docs/protocol.md, apimodels.app):
  ``kling-identify-face``, then ``kling-advanced-lip-sync``;
* result videos at ``/videos/{task_id}.mp4`` (64 KiB of fixed bytes, Range requests honoured).

Requests need ``Authorization: Bearer <key>`` with a key from ``api_keys`` (default
``"sk-sandbox"``) or, in the official format, an HS256 JWT signed for ``jwt_credentials``
(default access key ``"ak-sandbox"``, secret ``"sk-sandbox-secret-for-hs256-tokens"``).
Bodies are checked as the real server checks them (1201 with the field named).

Tasks go submitted -> processing -> succeed or failed over ``task_duration`` seconds (a number,
or a function of a ``random.Random``), computed from the event loop's clock whenever read.
Video URLs decide some outcomes: one containing ``"no-human"`` makes a lip-sync task fail with
"there is no human in the video"; ``"no-face"`` or ``"no-human"`` makes identify-face find no
face (apimodels: the task fails with "Face detection failed: no faces found"); ``"two-faces"``
makes it find two.

``task_limit`` caps the tasks running at once (the account's resource pack): one more submit is
refused with 1303 / HTTP 429 and creates nothing.  :class:`FaultPlan` injects failures at
seeded-random rates (assign ``server.faults`` to change them mid-run); ``server.script(...)``
answers the next requests of a route with a chosen error; ``server.set_account_error(code)``
breaks the whole account; ``server.finish(task_id)`` ends a task now.  Requests submitted with
a ``callback_url`` get callbacks (official: the task object on each state change; apimodels:
the documented envelope on terminal states), signed as Kling signs them when the server is given
a ``webhook_secret``.  Official answers carry what Kling's 2026 API returns: video ids and
durations, a watermark URL when ``watermark_info`` asked for one, and ``final_unit_deduction``
(:data:`UNITS_PER_5_SECONDS` a started 5 s of output; 0 for a failed task).  An unknown path is
answered with the official JSON error envelope (code 1202).

Inspect ``server.requests`` (a Counter by route name), ``server.faults_hit`` (a Counter of the
injected faults that struck, by kind), ``server.tasks`` (id -> :class:`FakeTask`),
``server.tasks_created``, ``server.running``, ``server.max_running_seen`` and
``server.callbacks_sent``.  Without ``async with``: ``await server.start()``, later
``await server.close()``.
"""

from ._official import UNITS_PER_5_SECONDS
from ._server import (
    NO_FAULTS,
    ROUTES,
    SANDBOX_API_KEY,
    SANDBOX_JWT_CREDENTIALS,
    FakeKlingServer,
)
from ._state import (
    CONTENT_POLICY_REASON,
    NO_HUMAN_REASON,
    FaceSession,
    FakeFace,
    FakeTask,
    FaultPlan,
)
from ._videos import video_bytes

__all__ = [
    "CONTENT_POLICY_REASON",
    "NO_FAULTS",
    "NO_HUMAN_REASON",
    "ROUTES",
    "SANDBOX_API_KEY",
    "SANDBOX_JWT_CREDENTIALS",
    "UNITS_PER_5_SECONDS",
    "FaceSession",
    "FakeFace",
    "FakeKlingServer",
    "FakeTask",
    "FaultPlan",
    "video_bytes",
]
