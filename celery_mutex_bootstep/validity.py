"""The session's deadline, shared with the pool processes, so they refuse stale starts.

A granted request can wait between the grant and the moment a pool process
starts it: prefork parks it in its outbound buffer until a process is free,
the threads pool in its executor's queue, and a worker may freeze in between.
The task may only start while the session that holds its lease is certainly
alive. The worker's main process writes ``(session id, deadline)`` to a small
file each time the heartbeat (or any answered request) moves the deadline, and
zeroes it the moment the session is given up or lost; a pool process reads it
when the task starts (see failclosed.py) and refuses the task when the
session differs or the deadline passed. The deadline is on the machine's
monotonic clock, which every process of the machine shares.

It also holds an epoch, which the worker moves on each broker reconnect
under prefork: ``pool.flush()`` then forgets the requests no process has
accepted yet, but one already written to a process's pipe would still run
there (or in the process that replaces it and inherits the pipe). Its lease
is released, so it must not start: the epoch stamped into it is now stale.

The record is ``seq, session, deadline, epoch, seq``: a reader that sees two
different ``seq`` read it while it was being written, and reads again.
"""
from __future__ import annotations

import os
import struct
import tempfile
import threading
import time
from typing import Dict, Optional

__all__ = ('SharedValidity', 'lease_valid')

_RECORD = struct.Struct('<QQdQQ')


def _directory() -> Optional[str]:
    shm = '/dev/shm'  # memory-backed where it exists: no disk write per heartbeat
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class SharedValidity:
    """The writer (worker main process; any thread)."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix='celery-mutex-validity-',
                                         dir=_directory())
        self._fd: Optional[int] = fd
        self._seq = 0
        self._lock = threading.Lock()
        self._last = (0, 0.0)
        self.epoch = 1
        self._write()

    def publish(self, session_id: Optional[int], deadline: Optional[float]) -> None:
        record = (session_id or 0, deadline or 0.0)
        with self._lock:
            if record != self._last:
                self._last = record
                self._write()

    def invalidate(self) -> None:
        self.publish(0, 0.0)

    def next_epoch(self) -> None:
        """Requests stamped before now may no longer start (broker reconnect)."""
        with self._lock:
            self.epoch += 1
            self._write()

    def _write(self) -> None:
        if self._fd is None:
            return
        self._seq += 1
        try:
            os.pwrite(self._fd, _RECORD.pack(self._seq, self._last[0], self._last[1],
                                             self.epoch, self._seq), 0)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass


_readers: Dict[str, int] = {}


def lease_valid(path: str, session_id: int, epoch: int) -> bool:
    """In a pool process: may a task holding a lease of ``session_id``, handed
    to the pool in ``epoch``, start now?"""
    fd = _readers.get(path)
    try:
        if fd is None:
            fd = _readers[path] = os.open(path, os.O_RDONLY)
        for _ in range(5):
            data = os.pread(fd, _RECORD.size, 0)
            if len(data) != _RECORD.size:
                return False
            seq, session, deadline, current, seq2 = _RECORD.unpack(data)
            if seq == seq2:
                return (session == session_id and current == epoch
                        and time.monotonic() < deadline)
    except OSError:
        pass
    return False  # unreadable: refusing is safe, the message goes back
