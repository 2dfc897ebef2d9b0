"""Ending a request with a stored result, without the consumer waiting on the
result backend.

Storing a result is a network call (Redis, a database...). The consumer thread
must never wait on one, so the store runs on a thread of its own; once it is
done the events are sent and the message is acknowledged back on the consumer
thread (through the inbox). So a message is acked only after its outcome is
recorded: a worker that dies in between leaves it unacknowledged and the
broker delivers it again. A store that fails hands the message back to the
broker (requeued), with an ERROR, rather than ending it unrecorded.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Deque, Optional, Sequence, Tuple

from . import messages

__all__ = ('Verdicts',)

logger = logging.getLogger('celery_mutex_bootstep.gate')

Event = Tuple[str, dict]


class Verdicts:
    def __init__(self, consumer: Any, post: Callable[..., None]) -> None:
        self.c = consumer
        self.post = post  # to the consumer thread, in order
        self._jobs: Deque[tuple] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stop = False

    def end(self, req: Any, store: Callable[[], None], events: Sequence[Event],
            ack: bool = True) -> None:
        """Run ``store()`` off the consumer thread; then send ``events`` and ack
        (``ack=False``: the message is someone else's to settle)."""
        self._submit((req, store, tuple(events), ack))

    def call(self, fun: Callable[[], None]) -> None:
        """Run ``fun`` off the consumer thread (a network call); errors are logged."""
        self._submit((None, fun, (), False))

    def _submit(self, job: tuple) -> None:
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='mutex-verdicts', daemon=True)
                self._thread.start()
            self._cond.notify()

    def failure(self, req: Any, exc: Exception, events: Sequence[Event]) -> None:
        """FAILURE with ``exc`` stored, then ``events`` and ``task-failed``."""
        def store() -> None:
            req.task.backend.mark_as_failure(
                req.id, exc, request=req._context, store_result=req.store_errors)
        self.end(req, store, tuple(events) + (
            ('task-failed', {'exception': repr(exc), 'traceback': ''}),))

    def revoked(self, req: Any, reason: str, events: Sequence[Event]) -> None:
        """REVOKED with ``reason`` stored, then ``events`` and ``task-revoked``."""
        def store() -> None:
            req.task.backend.mark_as_revoked(
                req.id, reason, request=req._context, store_result=req.store_errors)
        self.end(req, store, tuple(events) + (
            ('task-revoked', {'terminated': False, 'signum': None, 'expired': False,
                              'reason': reason}),))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs:
                    return
                req, store, events, ack = self._jobs.popleft()
            try:
                store()
                ok = True
            except Exception:
                if req is None:
                    logger.exception('mutex: %r failed', store)
                    continue
                logger.exception('mutex: could not store the result of %s[%s]%s', req.name,
                                 req.id, '; its message goes back to the broker' if ack else '')
                ok = False
            if req is not None:
                try:
                    self.post(self._done, req, events, ok, ack)
                except Exception:  # the inbox closed (shutdown): the broker redelivers it
                    logger.warning('mutex: could not settle %s[%s] after storing its result',
                                   req.name, req.id, exc_info=True)

    def _done(self, req: Any, events: Sequence[Event], ok: bool, ack: bool = True) -> None:
        if not ok and not ack:
            return
        if not ok:
            messages.reject(req, self.c.connection_errors, requeue=True)
            return
        for name, fields in events:
            try:
                req.send_event(name, **fields)
            except Exception:
                logger.debug('mutex: could not send %s for %s', name, req.id, exc_info=True)
        if ack:
            messages.ack(req, self.c.connection_errors)

    def close(self, timeout: float = 3.0) -> None:
        """Shutdown: finish the stores asked for (bounded); the rest stay
        unacknowledged and the broker delivers them again."""
        with self._cond:
            self._stop = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)
