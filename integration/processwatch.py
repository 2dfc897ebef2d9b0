"""When did a worker's processes die? Seen by the test (psutil), never by the
product (whose ``process_alive`` must not vouch for itself).

A process is one incarnation of a pid: the pid and the start time the kernel gives
it (``psutil.Process.create_time()``). A pid reused by a later process is a new one,
watched in its own right; the first is dead from the moment its pid shows another
start time.
"""
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import psutil

Incarnation = Tuple[int, float]  # pid, start time (epoch seconds)

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def started(pid: int) -> Optional[float]:
    """Start time of ``pid`` if it runs (not a zombie), else None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in _GONE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def alive(pid: int, start: Optional[float] = None) -> bool:
    """``pid`` runs (not a zombie), and is the incarnation started at ``start``."""
    st = started(pid)
    return st is not None and (start is None or st == start)


def children(pid: int) -> List[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


class ProcessWatch:
    """Watches the processes of a scenario's workers (main and pool children) and
    notes when each incarnation was first seen dead (``time.time()``, an upper bound
    of its death).

    ``died_at(pid, at)`` is None while the process lives or if it was never seen;
    ``at`` (a moment it ran, such as an execution's start) picks the incarnation of
    ``pid`` that ran then; without it, the first one seen.
    """

    def __init__(self, workers: Callable[[], Iterable], interval: float = 0.01) -> None:
        self._workers = workers  # callable -> iterable of WorkerProcess
        self.interval = interval
        self.owner: Dict[Incarnation, str] = {}
        self.born: Dict[Incarnation, float] = {}  # epoch seconds, clock-tick resolution
        self.died: Dict[Incarnation, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='process-watch', daemon=True)

    def start(self) -> 'ProcessWatch':
        self._scan()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._scan()

    def incarnations(self, pid: int) -> List[Incarnation]:
        return sorted((k for k in self.owner if k[0] == pid), key=lambda k: k[1])

    def died_at(self, pid: int, at: Optional[float] = None) -> Optional[float]:
        seen = self.incarnations(pid)
        if at is not None:  # the last one born before ``at`` (clock ticks round down)
            seen = [k for k in seen if self.born[k] <= at + 0.02] or seen[:1]
            seen = seen[-1:]
        return self.died.get(seen[0]) if seen else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._scan()
            except Exception:  # a worker list changing under us: next round
                pass

    def _scan(self) -> None:
        for w in list(self._workers()):
            main = w.pid
            if main is None:
                continue
            for pid in [main] + children(main):
                st = started(pid)
                if st is None:
                    continue
                key = (pid, st)
                if key not in self.owner:
                    self.owner[key] = w.hostname
                    self.born[key] = st
        for key in list(self.owner):
            if key not in self.died and not alive(*key):
                self.died[key] = time.time()
