"""``mutex_wait_timeout``: a call that waited this long for its key fails.

The wait is counted from when the message first waited for its key, on any
worker: a parked copy carries that time in ``x-mutex-waiting-since``
(:func:`.waiting.waiting_since`), so parking, a hand-over or a sweep's move do
not restart it. Where the deadline is enforced:

* in the consumer's waiting room, by the waiter's own timer, at the deadline;
* whenever a message reaches the gate again (handed over from its park queue,
  moved back to its queue by a sweep, delivered again after a crash): one past
  its deadline fails there, before it asks for the key.

A message parked on the broker cannot be reached before it leaves its park
queue (a queue has no search). But the line is in arrival order: when a room
waiter fails at its deadline, the worker refills the room from the park queue,
and the next, if overdue too, fails at once and makes room for the next (the
gate does this), so a line of overdue messages drains when its head's deadline
passes. A parked message whose deadline comes before those ahead of it (a
shorter ``mutex_wait_timeout`` of another task sharing a ``mutex_name``), or of
a line no worker follows any more (the sweep moves one message per 5 s), fails
late: when it leaves its park queue, never run after its deadline.

Failing is visible as a skip is: FAILURE with :class:`MutexContended` (its
reason names the timeout), a WARNING naming task and key, the events
``mutex-wait-timeout`` and ``task-failed``; the message is acknowledged only
after the result is stored (:mod:`.verdicts`). Consumer thread only.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from celery.worker import state as worker_state

from .exceptions import MutexContended
from .waiting import SINCE_HEADER

__all__ = ('Deadlines', 'known_since')

logger = logging.getLogger('celery_mutex_bootstep.gate')

# A timer shorter than this would only spin the loop.
_MIN_DELAY = 0.005


def known_since(req: Any) -> Optional[float]:
    """When ``req`` first waited for its key, if it waited before (wall clock);
    None for a message that never waited (unlike ``waiting_since``, this never
    starts the clock)."""
    since = getattr(req, '_mutex_waiting_since', None)
    if since is not None:
        return since
    headers = getattr(getattr(req, 'message', None), 'headers', None) or {}
    value = headers.get(SINCE_HEADER)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= time.time():
        return float(value)
    return None


class Deadlines:
    def __init__(self, metrics: Any, verdicts: Any) -> None:
        self.metrics = metrics
        self.verdicts = verdicts

    @staticmethod
    def remaining(req: Any, key: Any, now: Optional[float] = None) -> Optional[float]:
        """Seconds ``req`` may still wait for ``key`` (<= 0: overdue); None: no limit."""
        limit = key.policy.wait_timeout
        if limit is None:
            return None
        since = known_since(req)
        if since is None:
            return float(limit)
        return since + limit - (time.time() if now is None else now)

    def overdue(self, req: Any, key: Any) -> bool:
        left = self.remaining(req, key)
        return left is not None and left <= 0

    def delay(self, req: Any, key: Any, delay: float) -> float:
        """The waiter's next timer: its re-check delay, or its deadline if sooner."""
        left = self.remaining(req, key)
        return delay if left is None else max(_MIN_DELAY, min(delay, left))

    def expire(self, req: Any, key: Any) -> None:
        """Fail ``req``: it waited ``mutex_wait_timeout`` for ``key``."""
        self.metrics.inc('wait_timeout')
        worker_state.task_ready(req)
        limit = key.policy.wait_timeout
        since = known_since(req)
        waited = time.time() - since if since is not None else 0.0
        reason = f'waited {waited:.1f}s, past its mutex_wait_timeout of {limit:g}s'
        logger.warning('mutex: %s[%s] failed: %s for %s (mutex_wait_timeout)',
                       req.name, req.id, reason, key.describe())
        exc = MutexContended(req.name, key.describe(), reason)
        self.verdicts.failure(req, exc, (('mutex-wait-timeout', {
            'key': key.digest, 'mutex': key.describe(), 'waited': round(waited, 3)}),))
