"""When did a worker's processes die? Read from /proc by the test, never from the
product (whose ``process_alive`` must not vouch for itself).

A process is one incarnation of a pid: the pid and the start time the kernel gives
it (/proc/<pid>/stat field 22). A pid reused by a later process is a new one, watched
in its own right; the first is dead from the moment its pid shows another start time.
"""
import os
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

Incarnation = Tuple[int, int]  # pid, start time in clock ticks since boot

_TICKS = os.sysconf('SC_CLK_TCK')


def _boot_time() -> float:
    with open('/proc/stat') as f:
        for line in f:
            if line.startswith('btime '):
                return float(line.split()[1])
    raise RuntimeError('no btime in /proc/stat')


_BOOT = _boot_time()


def stat(pid: int) -> Optional[Tuple[bytes, int]]:
    """(state, start time in ticks) of ``pid``, None if there is no such process."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b')') + 2:].split()  # after the command name
    if len(fields) < 20:
        return None
    return fields[0], int(fields[19])  # state, starttime (field 22 of the line)


def alive(pid: int, start: Optional[int] = None) -> bool:
    """``pid`` runs (not a zombie), and is the incarnation started at ``start``."""
    st = stat(pid)
    if st is None or st[0] in (b'Z', b'X', b'x', b''):
        return False
    return start is None or st[1] == start


def children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


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
        self.born: Dict[Incarnation, float] = {}  # epoch seconds, 10 ms resolution
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
                st = stat(pid)
                if st is None or st[0] in (b'Z', b'X', b'x'):
                    continue
                key = (pid, st[1])
                if key not in self.owner:
                    self.owner[key] = w.hostname
                    self.born[key] = _BOOT + st[1] / _TICKS
        for key in list(self.owner):
            if key not in self.died and not alive(*key):
                self.died[key] = time.time()
