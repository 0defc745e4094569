"""kling_async: bulk lip-sync video generation through the Kling API, for asyncio.

Describe jobs with :class:`LipSyncJob`, open a :class:`KlingClient` for your server's dialect
and iterate :meth:`KlingClient.run_batch` for results in completion order.
"""

from importlib.metadata import PackageNotFoundError, version

from . import events  # the on_event records: ka.events.Finished, ...
from ._batch import BatchIterator
from ._client import APIMODELS_BASE_URL, DMXAPI_BASE_URL, OFFICIAL_BASE_URL, KlingClient
from ._config import PollPolicy, RetryPolicy
from ._errors import (
    AccountError,
    APIError,
    AuthenticationError,
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
from ._jobs import LipSyncJob
from ._results import BatchProgress, Face, JobResult, TaskSnapshot, TaskState
from ._transport import Timeouts

try:
    __version__ = version("kling-async")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "APIMODELS_BASE_URL",
    "DMXAPI_BASE_URL",
    "OFFICIAL_BASE_URL",
    "APIError",
    "AccountError",
    "AuthenticationError",
    "BatchIterator",
    "BatchProgress",
    "ConcurrencyLimitError",
    "ConnectError",
    "ContentPolicyError",
    "DownloadError",
    "Face",
    "InvalidRequestError",
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
    "RateLimitError",
    "RetryPolicy",
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
    "events",
]
