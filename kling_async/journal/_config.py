"""Where a shared journal lives and how its workers' leases behave (no I/O, no psycopg)."""

from __future__ import annotations

import math
import urllib.parse
from typing import Any

import attrs

from .._errors import ValidationError

__all__ = ["PostgresJournal", "is_postgres_url", "redact"]

_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: object) -> bool:
    """Whether ``target`` is a ``postgresql://`` (or ``postgres://``) URL."""
    return isinstance(target, str) and target.startswith(_SCHEMES)


def redact(url: str) -> str:
    """``url`` without its password (what logs, errors and reprs show)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _url(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not is_postgres_url(value):
        raise ValidationError("url", "must be a postgresql:// URL")


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(attribute.name, "must be a number of seconds above 0")


@attrs.frozen(kw_only=True)
class PostgresJournal:
    """A journal in a PostgreSQL database that several workers share.

    ``url`` is a libpq URL (``postgresql://user:password@host:5432/db``).  Every worker renews
    its lease every ``renew`` seconds; a worker not heard of for ``lease`` seconds counts as
    dead and the others take its jobs over.  A worker with nothing to claim looks again after
    ``claim_poll`` seconds (sooner when one of its own jobs ends); every ``claim_poll`` seconds
    too, the worker that polls the server for all (``kling_async._shared_poll``) looks for new
    tasks to follow, and the others read the recorded ends of their tasks.  A database that
    cannot be reached for ``connect_timeout`` seconds is a :class:`~kling_async.JournalError`;
    a connection that breaks mid-batch is replaced and its write runs again meanwhile.
    A plain URL passed as ``journal=`` means the defaults.
    """

    url: str = attrs.field(validator=_url, repr=redact)
    lease: float = attrs.field(default=30.0, validator=_positive)
    renew: float = attrs.field(default=10.0, validator=_positive)
    claim_poll: float = attrs.field(default=0.2, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.renew >= self.lease:
            raise ValidationError("renew", "must be shorter than lease (renew well before expiry)")
