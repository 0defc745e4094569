"""The PostgreSQL journal's writes on one job: each one statement, fenced by the claim.

One statement is one round trip and one transaction.  ``own`` locks the job's row only if this
worker holds it, and every change reads ``own``, so a job taken over by another worker is never
written.

Each statement answers one row: whether the job was this worker's, and whether it held a task
slot (before the statement), and for :data:`REGAIN_SLOT` whether it holds one now.
"""

from __future__ import annotations

__all__ = [
    "CHARGE",
    "CREATED",
    "FINISHED",
    "LOWER_LIMIT",
    "REFUSED",
    "REGAIN_SLOT",
    "SLOT_ENDED",
    "SUBMITTING",
    "fenced",
]

_OWN = """own AS (
    SELECT key, slot FROM kling_jobs WHERE key = %(key)s AND worker = %(worker)s FOR UPDATE)"""


def fenced(changes: str, extra: str = "") -> str:
    """The statement that makes ``changes`` (data-modifying CTEs reading ``own``)."""
    return (
        f"WITH {_OWN},\n{changes}\n"
        f"SELECT EXISTS (SELECT 1 FROM own), COALESCE((SELECT slot FROM own), false){extra}"
    )


SUBMITTING = fenced("""w AS (
    INSERT INTO kling_stages (key, stage, status, intent_at, external_id)
    SELECT key, %(stage)s, 'submitting', %(at)s, %(external_id)s FROM own
    ON CONFLICT (key, stage) DO UPDATE SET status = EXCLUDED.status,
        intent_at = EXCLUDED.intent_at, task_id = NULL, snapshot = NULL,
        external_id = EXCLUDED.external_id, adopted = false)""")

CREATED = fenced("""w AS (
    INSERT INTO kling_stages
        (key, stage, status, intent_at, task_id, snapshot, external_id, adopted)
    SELECT key, %(stage)s, 'created', %(at)s, %(task_id)s, %(snapshot)s, %(external_id)s,
        %(adopted)s FROM own
    ON CONFLICT (key, stage) DO UPDATE SET status = EXCLUDED.status,
        task_id = EXCLUDED.task_id, snapshot = EXCLUDED.snapshot,
        adopted = EXCLUDED.adopted)""")

REFUSED = fenced("""w AS (
    UPDATE kling_stages s SET status = 'refused' FROM own
    WHERE s.key = own.key AND s.stage = %(stage)s)""")

#: Gives the slot of the job ``w`` names back to the account; a task that ended is a clean
#: finish (after ``lim`` of them the limit grows by one, up to ``capacity``).
_GIVE_BACK = """acc AS (
    UPDATE kling_account SET held = held - 1,
        lim = CASE WHEN %(ended)s AND lim < capacity AND clean + 1 >= lim
            THEN lim + 1 ELSE lim END,
        clean = CASE WHEN NOT %(ended)s THEN clean
            WHEN lim < capacity AND clean + 1 >= lim THEN 0 ELSE clean + 1 END
    WHERE id = 1 AND EXISTS (SELECT 1 FROM w WHERE held))"""

#: The result, and the job's slot back to the account, unless ``keep``: a timed-out task may
#: still run, and keeps its slot until it is seen to end (:data:`SLOT_ENDED`).
FINISHED = fenced(
    """w AS (
    UPDATE kling_jobs j SET result = %(result)s, final = %(final)s, reported = false,
        state = 'done', slot = own.slot AND %(keep)s
    FROM own WHERE j.key = own.key RETURNING own.slot AND NOT %(keep)s AS held),
"""
    + _GIVE_BACK
)

#: A timed-out task whose slot was kept has ended (or the worker stops following it).
SLOT_ENDED = fenced(
    """w AS (
    UPDATE kling_jobs j SET slot = false FROM own
    WHERE j.key = own.key AND own.slot RETURNING true AS held),
"""
    + _GIVE_BACK
)

#: A 1303 while the job held its slot: the account sustains one fewer than are held.
LOWER_LIMIT = fenced("""w AS (
    UPDATE kling_jobs j SET slot = false FROM own
    WHERE j.key = own.key AND own.slot RETURNING 1),
acc AS (
    UPDATE kling_account SET lim = GREATEST(1, held - 1), clean = 0, held = held - 1
    WHERE id = 1 AND EXISTS (SELECT 1 FROM w))""")

#: A slot for the job again, if the shared limit allows.
REGAIN_SLOT = fenced(
    """acc AS (
    UPDATE kling_account SET held = held + 1
    WHERE id = 1 AND held < lim AND EXISTS (SELECT 1 FROM own WHERE NOT slot) RETURNING 1),
w AS (
    UPDATE kling_jobs j SET slot = true FROM own
    WHERE j.key = own.key AND EXISTS (SELECT 1 FROM acc))""",
    ", EXISTS (SELECT 1 FROM acc)",
)

#: The job's budget reservation or charge becomes ``units`` (it replaces the job's earlier one),
#: and the batch's total follows, unless that would pass ``limit`` (not ``force``d: a job whose
#: task may exist is paid for anyway).  Locking ``kling_spend``'s row serialises every worker's
#: reservations, and the check reads the total as it is once the lock is had.  A lowering never
#: fails, so running the statement again (its answer lost) grants what the first run granted.
CHARGE = fenced(
    """prev AS (
    SELECT COALESCE((SELECT units FROM kling_charges WHERE key = %(key)s), 0) AS units),
acc AS (
    UPDATE kling_spend s SET total = s.total + %(units)s - prev.units FROM prev
    WHERE s.id = 1 AND EXISTS (SELECT 1 FROM own)
        AND (%(force)s OR %(units)s <= prev.units OR s.total + %(units)s - prev.units <= %(limit)s)
    RETURNING s.total),
w AS (
    INSERT INTO kling_charges (key, units, settled) SELECT %(key)s, %(units)s, %(settled)s FROM acc
    ON CONFLICT (key) DO UPDATE SET units = EXCLUDED.units, settled = EXCLUDED.settled)""",
    ", EXISTS (SELECT 1 FROM acc),"
    " COALESCE((SELECT total FROM acc), (SELECT total FROM kling_spend WHERE id = 1))",
)
