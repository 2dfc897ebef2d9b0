"""How the gate ends a request that will not run here: skipped, refused,
handed back, and the warning while ZooKeeper is away. Each is visible: a
stored result, an event, a log line; nothing is dropped silently."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from celery.worker import state as worker_state

from . import messages
from .exceptions import MutexContended

__all__ = ('Endings',)

logger = logging.getLogger('celery_mutex_bootstep.gate')

_UNAVAILABLE_LOG_EVERY = 10.0


class Endings:
    def __init__(self, consumer: Any, leases: Any, metrics: Any) -> None:
        self.c = consumer
        self.leases = leases
        self.metrics = metrics
        self._last_unavailable_log = 0.0

    def skip(self, req: Any, key: Any) -> None:
        """``mutex_contended='skip'``: drop visibly, never silently."""
        self.metrics.inc('skipped')
        worker_state.task_ready(req)
        exc = MutexContended(req.name, key.describe())
        logger.warning('mutex: %s[%s] skipped: %s is held (mutex_contended=skip)',
                       req.name, req.id, key.describe())
        messages.store_failure(req, exc)
        req.send_event('mutex-skipped', key=key.digest, mutex=key.describe())
        req.send_event('task-failed', exception=repr(exc), traceback='')
        messages.ack(req, self.c.connection_errors)

    def refuse(self, req: Any, exc: Exception) -> None:
        """Fail a request whose key cannot be built; do not requeue it."""
        self.metrics.inc('refused')
        logger.error('mutex: %s[%s] refused: %s', req.name, req.id, exc)
        worker_state.task_ready(req)
        messages.store_failure(req, exc)
        req.send_event('task-failed', exception=repr(exc), traceback='')
        self.reject(req, requeue=False)

    def reject(self, req: Any, requeue: bool) -> None:
        messages.reject(req, self.c.connection_errors, requeue=requeue)

    def waits(self, req: Any, key: Any, contended: bool,
              exc: Optional[BaseException]) -> None:
        """A request starts waiting (contended, or ZooKeeper away): counted,
        announced, logged."""
        worker_state.task_ready(req)
        if contended:
            self.metrics.inc('contended')
            req.send_event('mutex-contended', key=key.digest, mutex=key.describe())
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug('mutex: %s[%s] contended on %s', req.name, req.id, key.describe())
        else:
            self.metrics.inc('unavailable')
            self.log_unavailable(req, exc)

    def log_unavailable(self, req: Any, exc: Optional[BaseException]) -> None:
        """A WARNING at most every 10 s while ZooKeeper is away."""
        now = time.monotonic()
        if now - self._last_unavailable_log < _UNAVAILABLE_LOG_EVERY:
            return
        self._last_unavailable_log = now
        since = self.leases.disconnected_since
        for_ = f' for {now - since:.0f}s' if since is not None else ''
        logger.warning(
            'mutex: ZooKeeper (%s) is not reachable%s; guarded tasks are not run '
            'and go back to the broker (e.g. %s[%s])%s', self.leases.hosts, for_,
            req.name, req.id, f': {exc!r}' if exc else '')
