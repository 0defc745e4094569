"""kling_async: bulk lip-sync video generation through the Kling API, for asyncio.

Describe jobs with :class:`LipSyncJob`, open a :class:`KlingClient` for your server's dialect
and iterate :meth:`KlingClient.run_batch` for results in completion order.
"""

from typing import TYPE_CHECKING, Any

from ._errors import (
    AccountError,
    APIError,
    AuthenticationError,
    BudgetExceededError,
    CallbackSignatureError,
    ConcurrencyLimitError,
    ConnectError,
    ContentPolicyError,
    DownloadError,
    InvalidRequestError,
    JournalError,
    KlingError,
    LocalWriteError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SubmitOutcomeUnknownError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransportError,
    TransportTimeout,
    ValidationError,
    created_nothing,
    error_from_response,
)

if TYPE_CHECKING:
    from . import events
    from ._budget import Budget
    from ._client import APIMODELS_BASE_URL, DMXAPI_BASE_URL, OFFICIAL_BASE_URL, KlingClient
    from ._config import PollPolicy, RetryPolicy
    from ._cost import DEFAULT_PRICES, Estimate, JobEstimate, Prices, estimate
    from ._iterator import BatchIterator
    from ._jobs import LipSyncJob
    from ._options import ClientOptions
    from ._results import (
        BalanceDeduction,
        BatchProgress,
        Face,
        JobResult,
        Returned,
        TaskSnapshot,
        TaskState,
    )
    from ._transport import Timeouts

    __version__: str

# Imported on first use (module __getattr__, PEP 562): the client pulls in aiohttp and anyio,
# the records attrs, and ``__version__`` importlib.metadata, which a CLI ``--help`` or a
# program that only catches errors should not pay.  ``from kling_async import KlingClient``
# works as before; it imports what the client needs then.  The errors (plain classes) are eager.
_LAZY = {
    "APIMODELS_BASE_URL": "._client",
    "DMXAPI_BASE_URL": "._client",
    "OFFICIAL_BASE_URL": "._client",
    "KlingClient": "._client",
    "BatchIterator": "._iterator",
    "Timeouts": "._transport",
    "PollPolicy": "._config",
    "RetryPolicy": "._config",
    "LipSyncJob": "._jobs",
    "ClientOptions": "._options",
    "BatchProgress": "._results",
    "Face": "._results",
    "JobResult": "._results",
    "TaskSnapshot": "._results",
    "TaskState": "._results",
    "BalanceDeduction": "._results",
    "Returned": "._results",
    "Budget": "._budget",
    "DEFAULT_PRICES": "._cost",
    "Estimate": "._cost",
    "JobEstimate": "._cost",
    "Prices": "._cost",
    "estimate": "._cost",
}


# Hidden from type checkers: they read the names above (under TYPE_CHECKING), and a module
# __getattr__ returning Any would let a misspelt ``ka.LipSyncJb`` pass ``mypy --strict``.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name == "__version__":
            value: Any = _version()
        elif name == "events":  # the on_event records: ka.events.Finished, ...
            import importlib

            value = importlib.import_module(".events", __name__)
        elif name in _LAZY:
            import importlib

            value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value  # looked up once: the next access is a plain global
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kling-async")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0.0.0"


__all__ = [
    "APIMODELS_BASE_URL",
    "DEFAULT_PRICES",
    "DMXAPI_BASE_URL",
    "OFFICIAL_BASE_URL",
    "APIError",
    "AccountError",
    "AuthenticationError",
    "BalanceDeduction",
    "BatchIterator",
    "BatchProgress",
    "Budget",
    "BudgetExceededError",
    "CallbackSignatureError",
    "ClientOptions",
    "ConcurrencyLimitError",
    "ConnectError",
    "ContentPolicyError",
    "DownloadError",
    "Estimate",
    "Face",
    "InvalidRequestError",
    "JobEstimate",
    "JobResult",
    "JournalError",
    "KlingClient",
    "KlingError",
    "LipSyncJob",
    "LocalWriteError",
    "MalformedResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "PollPolicy",
    "Prices",
    "RateLimitError",
    "RetryPolicy",
    "Returned",
    "ServerError",
    "SubmitOutcomeUnknownError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskSnapshot",
    "TaskState",
    "TaskTimedOutError",
    "Timeouts",
    "TransportError",
    "TransportTimeout",
    "ValidationError",
    "__version__",
    "created_nothing",
    "error_from_response",
    "estimate",
    "events",
]
