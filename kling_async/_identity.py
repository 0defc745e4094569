"""External task ids: the caller's own name for a task, which the server keeps unique per account.

The official advanced lip-sync API takes an optional ``external_task_id``, refuses a second task
with the same one, echoes it in ``task_info.external_task_id`` and answers a query by it
(docs/protocol.md, Advanced lip-sync).  That makes a submit whose answer was lost resolvable
exactly: look the id up; found, it is the task; certainly absent, the submit can go again with
the same id, and a duplicate refusal proves that the first one created the task.

The documentation gives no length or character rule, so this library keeps to a safe subset
(:data:`MAX_EXTERNAL_ID_LENGTH` characters from :data:`EXTERNAL_ID_CHARS`) for ids it derives
and for ids users give.  A derived id is ``ka-<batch id>-<job part>``: the batch id is random
(kept in the journal, so a rerun derives the same ids), the job part is the job's key when it
fits, else a hash of it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

from ._errors import ValidationError

__all__ = [
    "EXTERNAL_ID_CHARS",
    "MAX_EXTERNAL_ID_LENGTH",
    "check_external_id",
    "derive_external_id",
    "new_batch_id",
]

#: Longest external task id this library sends (a conservative limit; the API states none).
MAX_EXTERNAL_ID_LENGTH = 64
#: Characters an external task id may use: letters, digits, ``-``, ``_`` and ``.``.
EXTERNAL_ID_CHARS = string.ascii_letters + string.digits + "-_."
_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX = "ka-"


def check_external_id(value: object) -> None:
    """Raise :class:`ValidationError` unless ``value`` is a safe external task id."""
    if not isinstance(value, str) or not value:
        raise ValidationError("external_task_id", "must be a non-empty string")
    if len(value) > MAX_EXTERNAL_ID_LENGTH:
        raise ValidationError(
            "external_task_id", f"must be at most {MAX_EXTERNAL_ID_LENGTH} characters"
        )
    if not _SAFE.fullmatch(value):
        raise ValidationError(
            "external_task_id", "may use only ASCII letters, digits, '-', '_' and '.'"
        )


def new_batch_id() -> str:
    """A random batch id: 16 hex digits (64 bits), unique among everyone's batches in practice."""
    return secrets.token_hex(8)


def derive_external_id(batch_id: str, name: str) -> str:
    """The external task id of job ``name`` (its key, or a unique name) in batch ``batch_id``.

    The name is kept (after a ``k``) when it is short and safe, else replaced by ``h`` and 24 hex
    digits of its SHA-256: the id stays stable for the same batch and name, and distinct names
    give distinct ids.
    """
    room = MAX_EXTERNAL_ID_LENGTH - len(_PREFIX) - len(batch_id) - 2
    if len(name) <= room and _SAFE.fullmatch(name):
        part = "k" + name
    else:
        part = "h" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:24]
    return f"{_PREFIX}{batch_id}-{part}"
