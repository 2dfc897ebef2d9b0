"""Calls handed to the consumer thread, run in order, waking its event loop.

kazoo's answers, the session deadline and the gate's own timers all end up here.
Two things the consumer's ``call_soon`` does not give:

* order: the hub's ready set runs its callbacks in no particular order;
* a wake-up on every kombu the step supports: kombu 5.7's ``Hub.call_soon``
  writes its waker only when called from another thread, and kombu 5.3-5.6
  never do, so a callback waits until the poll returns on its own (the next
  socket event or timer, up to a second when idle).

So the inbox owns a pipe registered with the hub as a reader: posting writes
one byte (non-blocking, only when the pipe is not already pending), from any
thread, and the loop drains every pending call when it polls. Without a hub
(``synloop``: solo or threads pool on a transport without async support) calls
go through ``consumer.call_soon``, which that loop drains on every turn.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

__all__ = ('Inbox',)

logger = logging.getLogger(__name__)


class Inbox:
    """A FIFO of calls from any thread, drained on the consumer thread."""

    def __init__(self, consumer: Any) -> None:
        self.c = consumer
        self._calls: Deque[Tuple[Callable[..., Any], tuple]] = deque()
        self._lock = threading.Lock()
        self._pending = False
        self._hub: Any = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def attach(self) -> None:
        """Register with the consumer's hub (consumer thread, on every consumer
        start: a broker reconnect resets the hub and forgets its readers)."""
        hub = getattr(self.c, 'hub', None)
        if hub is not None:
            try:
                hub.remove(self._r)
            except Exception:
                pass
            hub.add_reader(self._r, self._readable)
        self._hub = hub
        with self._lock:
            self._pending = bool(self._calls)
        if self._calls:
            self._wake()

    def post(self, fun: Callable[..., Any], *args: Any) -> None:
        """Run ``fun(*args)`` on the consumer thread, after what came before."""
        self._calls.append((fun, args))
        with self._lock:
            if self._pending:
                return
            self._pending = True
        self._wake()

    def _wake(self) -> None:
        if self._hub is not None:
            try:
                os.write(self._w, b'.')
            except (BlockingIOError, OSError):
                pass  # full: the loop is waking anyway
        else:
            self.c.call_soon(self.drain)

    def _readable(self) -> None:
        try:
            os.read(self._r, 4096)
        except (BlockingIOError, OSError):
            pass
        self.drain()

    def drain(self) -> None:
        """Run every pending call (consumer thread)."""
        with self._lock:
            self._pending = False
        calls = self._calls
        while calls:
            fun, args = calls.popleft()
            try:
                fun(*args)
            except Exception:
                logger.exception('mutex: %r failed', fun)

    def close(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            try:
                hub.remove(self._r)
            except Exception:
                pass
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def later(self, delay: float, fun: Callable[..., Any], *args: Any) -> Any:
        """``fun(*args)`` on the consumer thread after ``delay`` seconds (a timer
        entry of the consumer's timer, cancellable)."""
        return self.c.timer.call_after(delay, self.post, (fun,) + args)

    @property
    def hub(self) -> Optional[Any]:
        return self._hub
