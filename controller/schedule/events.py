"""Event de-duplication: a Warning that repeats on every retry is posted on a rising schedule."""

from __future__ import annotations

from collections.abc import Iterable

from controller.domain.model import Event, Retry
from controller.schedule.backoff import Streak

WarningKey = tuple[str, str]  # (reason, message) of a Warning Event


def warnings_to_post(
    events: Iterable[Event], warned: frozenset[WarningKey], streak: Streak
) -> tuple[tuple[Event, ...], frozenset[WarningKey]]:
    """The Events of a check worth posting, and the Warnings to remember for the next check.

    A Warning identical (reason and message) to one of the previous check's is not posted again
    on every retry of a failure that persists, only on a rising schedule: at the 2nd, 4th, 8th,
    ... failure in a row (``streak``), so a week of PermissionDenied posts a dozen Events, not
    thousands. A changed reason or message, and every Normal Event, is posted at once. A
    verification that keeps failing the same way (Retry.UNVERIFIED) warns once, not again.
    """
    events = tuple(events)
    current = frozenset((e.reason, e.message) for e in events if e.type == "Warning")
    rising = streak.count > 0 and streak.count & (streak.count - 1) == 0  # a power of two
    if streak.retry is Retry.UNVERIFIED:
        # The same verification failure: its checks already back off exponentially, so its
        # Warnings are posted once (the streak starts over, and warns again, when it changes).
        rising = False
    post = tuple(
        e for e in events if e.type != "Warning" or rising or (e.reason, e.message) not in warned
    )
    return post, current
