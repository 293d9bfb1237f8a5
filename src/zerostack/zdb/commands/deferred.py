"""Replies that come later: a handler calls `defer(session, job)` and returns None; the
server holds the client's next requests, awaits `job()` and sends what it returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from zerostack.zdb.commands.session import Session

Job = Callable[[], Awaitable[bytes]]

_JOBS: dict[Session, Job] = {}


def defer(session: Session, job: Job) -> None:
    _JOBS[session] = job


def take(session: Session) -> Job | None:
    """The job a handler left for this session (None: the reply is a plain WAIT)."""
    return _JOBS.pop(session, None)
