"""``mutex_contended='coalesce'``: one running, one waiting per key; a newer call
replaces the waiting one.

For "refresh account X" bursts: running every call of a burst one after the
other is wasted work, dropping them all loses the last state. So a worker's
gate keeps at most one waiter per key in its consumer: when another call of the
key arrives (answered contended, or finding the key's waiter there), the
*older* of the two ends, visibly, as superseded, and the newer waits.

"Newer" is by arrival at this worker's gate (its arrival number), not by
publish time, which Celery messages do not carry. A copy that went back to its
queue after waiting 10 minutes (RabbitMQ's consumer timeout would close the
channel) carries when it first waited (``x-mutex-waiting-since``) and counts
as older than any call that never waited.

Superseded is a state, not a disappearance: REVOKED is stored with the reason
``superseded by <task id> (mutex_contended=coalesce)``, a WARNING names both
tasks and the key, the events ``mutex-superseded`` and ``task-revoked`` are
sent; the message is acknowledged only after the result is stored
(:mod:`.verdicts`).

Across workers: each worker's gate keeps its own waiter, so with W workers
consuming the key's queue up to W calls wait (each the newest that worker
saw) and one runs. Coalesced waiters are never parked on the broker: a park
queue cannot drop its older entry visibly without taking every message ahead
of it. Consumer thread only.
"""
from __future__ import annotations

import logging
from typing import Any, Tuple

from celery.worker import state as worker_state

from .waiting import SINCE_HEADER, waiting_since

__all__ = ('Coalescing', 'ONE_WAITING')

#: Policies that keep one waiter per key in a worker ('replace' waits as 'coalesce').
ONE_WAITING = ('coalesce', 'replace')

logger = logging.getLogger('celery_mutex_bootstep.gate')


def _order(req: Any, seq: int) -> Tuple[int, float, int]:
    """Sort key, older first: copies that waited before they were delivered
    here (their header; not the clock a wait here starts), by when they first
    waited, then the others by arrival at this gate."""
    headers = getattr(getattr(req, 'message', None), 'headers', None) or {}
    since = headers.get(SINCE_HEADER)
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        return (0, float(since), seq)
    return (1, 0.0, seq)


class Coalescing:
    def __init__(self, room: Any, verdicts: Any, metrics: Any) -> None:
        self.room = room
        self.verdicts = verdicts
        self.metrics = metrics

    def make_room(self, req: Any, key: Any, seq: int) -> bool:
        """``req`` is about to wait for ``key``: supersede the older of it and
        the key's waiter. True: ``req`` waits (the place is free for it)."""
        held = self.room.first(key.digest)
        if held is None:
            return True
        if _order(req, seq) < _order(held.req, held.seq):
            self.supersede(req, key, held.req)
            return False
        # Its acquisition, if one is in flight, is dropped when it answers.
        self.room.leave(held)
        self.supersede(held.req, key, req)
        return True

    def supersede(self, req: Any, key: Any, by: Any) -> None:
        self.metrics.inc('superseded')
        worker_state.task_ready(req)
        policy = f'mutex_contended={key.policy.contended}'
        reason = f'superseded by {by.id} ({policy})'
        logger.warning('mutex: %s[%s] superseded by %s[%s] on %s (%s)',
                       req.name, req.id, by.name, by.id, key.describe(), policy)
        self.verdicts.revoked(req, reason, (('mutex-superseded', {
            'key': key.digest, 'mutex': key.describe(), 'by': by.id}),))

    @staticmethod
    def stamp(req: Any) -> None:
        """Before a waiter goes back to its queue as a fresh copy: the copy
        carries when it first waited, so it stays the older on its return."""
        headers = req.message.headers
        if isinstance(headers, dict):
            headers[SINCE_HEADER] = waiting_since(req)
