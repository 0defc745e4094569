"""The options every :class:`~kling_async.KlingClient` constructor takes, typed once.

The constructors (``kling``, ``dmxapi``, ``apimodels``) take them as ``**options`` typed with
this :class:`ClientOptions`, so editors and type checkers know every name and type while the
names, types and docs live in one place; the client's ``__init__`` checks the values.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypedDict

from ._config import PollPolicy, RetryPolicy

if TYPE_CHECKING:
    # For the type checker only: a TypedDict keeps its annotations as strings, and importing
    # aiohttp here would load the network stack for ``import kling_async`` (start-up time).
    import aiohttp

    from ._transport import Timeouts

__all__ = ["ClientOptions"]


class ClientOptions(TypedDict, total=False):
    """What every constructor (:meth:`KlingClient.kling`, ``dmxapi``, ``apimodels``) takes.

    All keyword-only and optional; typed here once so that editors and type checkers know them.

    * ``max_in_flight`` (20): tasks the client keeps running on the server at once (the vendor
      limits running tasks per account, not requests).
    * ``poll`` (:class:`PollPolicy`) and ``retry`` (:class:`RetryPolicy`): status queries and
      retries.
    * ``session``: your own ``aiohttp.ClientSession``, used as it is and left open.
    * ``timeouts`` (:class:`Timeouts`): connect and total times of API calls and downloads.
    * ``max_downloads`` (4): videos :meth:`KlingClient.download` fetches at once.
    * ``rng`` and ``clock``: the random source (jitter) and the wall clock, for tests.
    * ``webhook_secret``: the account's Webhook Secret (``"whsec_..."``, or a list while you
      rotate it): :meth:`KlingClient.handle_callback` and the
      :class:`~kling_async.webhook.CallbackReceiver` then refuse callbacks whose Standard
      Webhooks signature does not verify.
    """

    max_in_flight: int
    poll: PollPolicy
    retry: RetryPolicy
    session: aiohttp.ClientSession | None
    timeouts: Timeouts
    max_downloads: int
    rng: random.Random | None
    clock: Callable[[], float]
    webhook_secret: str | Iterable[str] | None
