"""What one worker knows of the park queues of the keys it follows: how many
messages each holds, and how long the oldest of those it parked has waited.

Nothing here talks to the broker. The parking thread (:mod:`.parking`) says
what it did and measured; readers on other threads (``celery inspect
mutex_leases`` on the consumer thread, a Prometheus scrape) take a short lock
and never wait on the network.

* **count**: measured by the parking thread's sweep (the message count a
  ``queue_declare`` returns), moved by this worker's own parks and unparks in
  between. None until known. Other workers' parks and unparks of the key show
  at the next measure.
* **oldest**: the first-waited time (``x-mutex-waiting-since``) of the messages
  this worker parked that may still be parked. A park queue is FIFO, so when a
  message parked at T leaves its head, every message parked up to T has left
  too; and the queue holds only its newest ``count`` messages, so at most that
  many of ours. Both rules only forget messages that are surely gone (with the
  hosts' clocks in step), so the age is not understated. Messages other
  workers parked are theirs to report.

Memory is bounded: per key at most ``RUNS_MAX`` runs of consecutive parks, each
kept as (latest parked-at, earliest first-wait, size). Past that the newest
run absorbs further parks, which keeps its earliest first-wait.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Tuple

__all__ = ('ParkedView', 'RUNS_MAX')

RUNS_MAX = 64


class _Line:
    __slots__ = ('count', 'runs', 'tracked', 'measured_at')

    def __init__(self) -> None:
        self.count: Optional[int] = None
        self.runs: Deque[List[float]] = deque()   # [parked_at, since, n], oldest first
        self.tracked = 0                           # messages the runs stand for
        self.measured_at = 0.0

    def oldest(self) -> Optional[float]:
        return min((run[1] for run in self.runs), default=None)

    def trim(self) -> None:
        """Keep no more of ours than the queue holds: its newest ``count``."""
        if self.count is None:
            return
        while self.tracked > self.count and self.runs:
            first = self.runs[0]
            drop = min(int(first[2]), self.tracked - self.count)
            first[2] -= drop
            self.tracked -= drop
            if first[2] <= 0:
                self.runs.popleft()


class ParkedView:
    """Per key: (count or None, earliest first-wait of ours still parked or None)."""

    def __init__(self, runs_max: int = RUNS_MAX) -> None:
        self.runs_max = max(1, runs_max)
        self._lines: Dict[str, _Line] = {}
        self._lock = threading.Lock()

    # -- told by the parking thread -----------------------------------------

    def parked(self, digest: str, parked_at: float, since: float) -> None:
        """This worker's copy of a message is in the park queue (confirmed)."""
        with self._lock:
            line = self._lines.setdefault(digest, _Line())
            if line.count is not None:
                line.count += 1
            if len(line.runs) < self.runs_max:
                line.runs.append([parked_at, since, 1])
            else:
                last = line.runs[-1]
                last[0], last[1], last[2] = parked_at, min(last[1], since), last[2] + 1
            line.tracked += 1

    def unparked(self, digest: str, parked_at: Optional[float]) -> None:
        """The head of the park queue, parked at ``parked_at``, left it."""
        with self._lock:
            line = self._lines.get(digest)
            if line is None:
                return
            if line.count is not None:
                line.count = max(0, line.count - 1)
            if parked_at is not None:
                # A run leaves whole only once its latest park did.
                while line.runs and line.runs[0][0] <= parked_at:
                    line.tracked -= int(line.runs.popleft()[2])
            line.trim()

    def measured(self, digest: str, count: int, now: Optional[float] = None) -> None:
        """The park queue held ``count`` messages (0: found empty)."""
        with self._lock:
            line = self._lines.setdefault(digest, _Line())
            line.count = max(0, int(count))
            line.measured_at = time.monotonic() if now is None else now
            line.trim()

    def retain(self, digests: Iterable[str]) -> None:
        """Forget the keys this worker no longer follows."""
        keep = set(digests)
        with self._lock:
            for digest in [d for d in self._lines if d not in keep]:
                del self._lines[digest]

    def due(self, digests: Iterable[str], n: int) -> List[str]:
        """The ``n`` of ``digests`` measured longest ago (never measured first)."""
        with self._lock:
            when = {d: (self._lines[d].measured_at if d in self._lines else 0.0)
                    for d in digests}
        return sorted(when, key=lambda d: (when[d], d))[:max(0, n)]

    # -- read from any thread ----------------------------------------------

    def lines(self) -> Dict[str, Tuple[Optional[int], Optional[float]]]:
        with self._lock:
            return {d: (line.count, line.oldest()) for d, line in self._lines.items()}
