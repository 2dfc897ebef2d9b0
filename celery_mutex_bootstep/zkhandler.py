"""kazoo's threading handler, with a select that costs one system call.

kazoo's connection thread calls ``handler.select`` about five times per
request: while waiting, before writing it, before reading the reply's length
and its body. The threading handler's ``selector_select`` builds and closes an
epoll selector each time (four system calls and two dicts, about 35 us here,
more than the rest of a request's handling); ``poll`` does the same in one
call and, like ``selector_select`` (why kazoo left ``select.select``), has no
limit on descriptor numbers.

Same semantics as ``selector_select``: the ready objects of the lists given,
empty lists on time-out, ``TypeError`` for a closed socket (``ValueError`` for
a descriptor number not open), and an error or a hang-up reported as ready (the read or write then raises, which kazoo
turns into a dropped connection).
"""
from __future__ import annotations

import math
import select
from typing import Any, List, Optional, Sequence, Tuple

from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import fileobj_to_fd as _fd

__all__ = ('PollingThreadingHandler', 'default_handler', 'poll_select')

_READ = select.POLLIN | select.POLLPRI
_FAILED = select.POLLERR | select.POLLHUP


def poll_select(rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any],
                timeout: Optional[float] = None) -> Tuple[List[Any], List[Any], List[Any]]:
    """``select.select``'s interface on ``poll`` (``xlist`` is ignored, as
    kazoo's own selector version does)."""
    if timeout is not None:
        if not isinstance(timeout, (int, float)):
            raise TypeError('timeout must be a number')
        if timeout < 0:
            raise ValueError('timeout must be non-negative')
    masks = {}
    for obj in rlist:
        fd = _fd(obj)
        masks[fd] = masks.get(fd, 0) | _READ
    for obj in wlist:
        fd = _fd(obj)
        masks[fd] = masks.get(fd, 0) | select.POLLOUT
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    # poll takes milliseconds; round up so a short wait never spins at 0.
    ready = dict(poller.poll(None if timeout is None else math.ceil(timeout * 1000)))
    if not ready:
        return [], [], []
    if any(events & select.POLLNVAL for events in ready.values()):
        raise ValueError('Invalid event mask or fd')
    readable = [obj for obj in rlist
                if ready.get(_fd(obj), 0) & (_READ | _FAILED)]
    writable = [obj for obj in wlist
                if ready.get(_fd(obj), 0) & (select.POLLOUT | _FAILED)]
    return readable, writable, []


class PollingThreadingHandler(SequentialThreadingHandler):
    """kazoo's :class:`SequentialThreadingHandler` with :func:`poll_select`."""

    name = 'polling_threading_handler'

    def select(self, *args: Any, **kwargs: Any) -> Tuple[List[Any], List[Any], List[Any]]:
        return poll_select(*args, **kwargs)


def default_handler() -> SequentialThreadingHandler:
    """The handler the step's client uses: polling where ``poll`` exists."""
    if hasattr(select, 'poll'):
        return PollingThreadingHandler()
    return SequentialThreadingHandler()
