"""The batch journal: one storage contract, SQLite (default) and PostgreSQL backends.

* A file path keeps the journal in SQLite (:class:`._sqlite.Journal`): one process
  runs the batch, and a rerun after a crash resumes it.
* A ``postgresql://`` URL (or a :class:`PostgresJournal` with lease settings) keeps it in a
  PostgreSQL database that several workers share (:mod:`._pg`): every worker runs the same jobs
  against the same database; each job runs once, on whichever worker claims it, and
  ``max_in_flight`` is the account's limit across all of them.  Needs the extra
  ``kling-async[postgres]`` (psycopg), imported only when such a journal is opened.

Both keep :class:`JournalBackend` (:mod:`._contract`).
"""

from __future__ import annotations

import os

from .._errors import ValidationError
from ._config import PostgresJournal, is_postgres_url
from ._contract import Claim, JournalBackend, SharedBackend
from ._sqlite import Journal

__all__ = [
    "Claim",
    "JournalBackend",
    "PostgresJournal",
    "SharedBackend",
    "check_target",
    "is_shared",
    "open_journal",
]

EXTRA_HINT = "pip install 'kling-async[postgres]'"


def is_shared(target: object) -> bool:
    """Whether ``target`` names a journal several workers share (PostgreSQL)."""
    return isinstance(target, PostgresJournal) or is_postgres_url(target)


def check_target(target: object) -> None:
    """Raise :class:`ValidationError` unless ``target`` names a journal this install can open.

    A PostgreSQL URL without psycopg installed is refused here, naming the extra to install.
    """
    if isinstance(target, PostgresJournal) or is_postgres_url(target):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ValidationError(
                "journal",
                f"a PostgreSQL journal needs the optional dependency psycopg: {EXTRA_HINT}",
            ) from None
        return
    if not isinstance(target, (str, os.PathLike)):
        raise ValidationError(
            "journal", "must be a file path, a postgresql:// URL or a PostgresJournal"
        )


async def open_journal(
    target: str | os.PathLike[str] | PostgresJournal,
    *,
    dialect: str,
    stage: str,
    base_url: str,
    max_in_flight: int,
) -> JournalBackend:
    """Open the journal ``target`` names for a batch of ``dialect`` at ``base_url``.

    ``max_in_flight`` is the account's task limit: a shared journal keeps it for all workers.
    """
    check_target(target)
    if isinstance(target, PostgresJournal) or is_postgres_url(target):
        from ._pg import PgJournal  # psycopg is imported here, never by ``import kling_async``

        config = target if isinstance(target, PostgresJournal) else PostgresJournal(url=str(target))
        return await PgJournal.open(
            config, dialect=dialect, stage=stage, base_url=base_url, max_in_flight=max_in_flight
        )
    return await Journal.open(target, dialect=dialect, stage=stage, base_url=base_url)
