"""What a journal keeps of the server between runs, the same way for both backends.

The server clock's calibrated offset (:class:`~kling_async._reconcile.ClockOffset`) and whether
the server echoes external task ids are two ``meta`` rows; each backend writes a meta row its own
way (:meth:`ServerFacts._set_meta`), with its next write.
"""

from __future__ import annotations

__all__ = ["ServerFacts"]


class ServerFacts:
    """The clock offset and external-id facts of a journal (a base of each backend's class)."""

    clock_offset: tuple[float, float] | None
    external_ids_confirmed: bool

    def set_clock_offset(self, lo: float, hi: float) -> None:
        """Keep the server clock's offset interval (written with the journal's next write)."""
        self.clock_offset = (lo, hi)
        self._set_meta("clock_offset", f"{lo!r} {hi!r}")

    def confirm_external_ids(self) -> None:
        """Keep that the server echoes external ids (written with the journal's next write)."""
        self.external_ids_confirmed = True
        self._set_meta("external_ids", "confirmed")

    def _set_meta(self, name: str, value: str) -> None:
        """Queue the meta row ``name`` = ``value`` (each backend writes it its own way)."""
        raise NotImplementedError
