"""Real ``celery worker`` processes for tests and examples.

``start_worker('myapp', hostname='w1@%h', log_dir=...)`` runs
``python -m celery -A myapp worker ...`` in its own process group, with stdout and stderr in
``log_dir/<hostname>.log``, and returns a :class:`WorkerProcess`; ``wait_ready()`` waits for
Celery's "ready." line.

Fault injection: ``stop()`` (SIGTERM = warm shutdown), ``kill()`` (SIGKILL of the main
process only; ``kill_group()`` later takes the rest of the group), ``pause()``/``resume()``
(SIGSTOP/SIGCONT, by default of the whole group: a frozen worker).

Note: Celery's prefork pool children set PR_SET_PDEATHSIG=SIGKILL themselves, so after
``kill()`` of the main process they normally die within milliseconds as well.

Every worker started here that still runs when this Python process exits is killed
(atexit; and, when started from the main thread, also via ``setpriv --pdeathsig``).
Listing a worker's processes needs psutil (the ``test`` and ``demo`` extras).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from .zookeeper import _pdeathsig_prefix

__all__ = ['WorkerError', 'WorkerProcess', 'start_worker', 'worker_env']

READY_RE = re.compile(r'@\S+ ready\.\s*$', re.M)
_READY_LEVELS = {'DEBUG', 'INFO', '10', '20'}


class WorkerError(RuntimeError):
    """A worker died or did not get ready in time."""


_LIVE = set()
_LOCK = threading.Lock()


def _cleanup_at_exit():
    me = os.getpid()
    with _LOCK:
        workers = [w for w in _LIVE if w._owner_pid == me]
    for w in workers:
        w.kill_group()


atexit.register(_cleanup_at_exit)


def _live_processes():
    """(pid, ppid, pgid) of every live (non-zombie) process."""
    import psutil  # only needed to list processes: the test and demo extras install it
    for proc in psutil.process_iter(['ppid', 'status']):
        if proc.info['status'] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            yield proc.pid, proc.info['ppid'], os.getpgid(proc.pid)
        except ProcessLookupError:  # ended meanwhile
            continue


def _safe_name(hostname):
    host = socket.gethostname()
    name = hostname.replace('%h', host).replace('%n', host.split('.')[0])
    name = name.replace('%d', host.partition('.')[2])
    return re.sub(r'[^A-Za-z0-9_.@-]+', '_', name.replace('%', '')) or 'worker'


class WorkerProcess:
    """One ``celery worker`` process (plus its pool children) in its own process group."""

    def __init__(self, cmd, *, hostname, log_path, env, loglevel='INFO', cwd=None):
        self.cmd = list(cmd)
        self.hostname = hostname
        self.log_path = log_path
        self.env = env
        self.loglevel = str(loglevel)
        self.cwd = cwd or os.path.dirname(log_path)
        self._proc = None
        self.pgid = None
        self._owner_pid = None
        self._last_children = []

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> 'WorkerProcess':
        if self._proc is not None:
            raise WorkerError('worker %s already started' % self.hostname)
        with open(self.log_path, 'ab') as log:
            log.write(('--- %s starting: %s\n' % (
                time.strftime('%Y-%m-%d %H:%M:%S'), ' '.join(self.cmd))).encode())
            log.flush()
            self._proc = subprocess.Popen(
                _pdeathsig_prefix() + self.cmd, cwd=self.cwd, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True)
        self.pgid = self._proc.pid  # session leader == process group leader
        self._owner_pid = os.getpid()
        with _LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self):
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self):
        return self._proc.poll() if self._proc is not None else None

    def is_running(self):
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout=None):
        """Wait for the main process to exit; return its return code."""
        return self._proc.wait(timeout)

    def wait_ready(self, timeout: float = 60):
        """Wait for Celery's '<hostname> ready.' log line (needs loglevel INFO or DEBUG)."""
        if self.loglevel.upper() not in _READY_LEVELS:
            raise WorkerError("wait_ready() needs loglevel INFO or DEBUG (Celery logs "
                              "'ready.' at INFO); this worker logs at %s" % self.loglevel)
        return self.wait_for_log(READY_RE, timeout, what='ready')

    def wait_for_log(self, pattern, timeout=30, *, start=0, what=None):
        """Wait until the log (from character offset *start*) matches *pattern*
        (a regex string or compiled pattern); return the match.
        Raises WorkerError with the log tail if the worker exits or the time runs out."""
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log_text(), start)
            if m:
                return m
            if not self.is_running():
                m = regex.search(self.log_text(), start)  # written just before exiting?
                if m:
                    return m
                raise WorkerError('worker %s exited (rc=%s) before %s:\n%s' % (
                    self.hostname, self.returncode, what or regex.pattern, self.log_tail()))
            if time.monotonic() >= deadline:
                raise WorkerError('worker %s: no %s after %.0f s:\n%s' % (
                    self.hostname, what or regex.pattern, timeout, self.log_tail()))
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> Optional[int]:
        """Warm shutdown: SIGTERM to the main process, wait up to *timeout*, then SIGKILL
        the whole group. Leftover group members are killed too. Returns the return code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.terminate()  # SIGCONT too: a paused worker cannot act on SIGTERM
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(10)
        self.kill_group()
        return self._proc.returncode

    def terminate(self):
        """Send the warm-shutdown SIGTERM (and SIGCONT) without waiting; see stop()."""
        self._signal_main(signal.SIGTERM)
        self._signal_group(signal.SIGCONT)

    def kill(self):
        """SIGKILL the main process only (a crash); its group id is kept so that
        kill_group() can clean up pool children that outlive it."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._last_children = self.child_pids()
        self._signal_main(signal.SIGKILL)
        self._proc.wait(10)

    def kill_group(self):
        """SIGKILL every remaining process of the worker's process group."""
        if self.pgid is not None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGKILL)
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + 5
            while self.group_pids() and time.monotonic() < deadline:
                time.sleep(0.02)
        with _LOCK:
            _LIVE.discard(self)

    def pause(self, group=True):
        """SIGSTOP the whole process group (or only the main process with group=False)."""
        if group:
            self._signal_group(signal.SIGSTOP)
        else:
            self._signal_main(signal.SIGSTOP)

    def resume(self, group=True):
        if group:
            self._signal_group(signal.SIGCONT)
        else:
            self._signal_main(signal.SIGCONT)

    def _signal_main(self, sig):
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def _signal_group(self, sig):
        if self.pgid is None:
            return
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ----------------------------------------------------------------- inspection
    def child_pids(self) -> List[int]:
        """Live (non-zombie) direct children of the main process, e.g. the pool processes."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        main = self._proc.pid
        return sorted(pid for pid, ppid, _ in _live_processes() if ppid == main)

    @property
    def last_children(self):
        """child_pids() as they were just before kill()."""
        return list(self._last_children)

    def group_pids(self) -> List[int]:
        """Live (non-zombie) processes of the worker's process group, main included."""
        if self.pgid is None:
            return []
        return sorted(pid for pid, _, pgid in _live_processes() if pgid == self.pgid)

    def log_text(self) -> str:
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def log_tail(self, lines=50):
        return '\n'.join(self.log_text().splitlines()[-lines:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return '<WorkerProcess %s pid=%s rc=%s>' % (self.hostname, self.pid, self.returncode)


def worker_env(env: Optional[Dict[str, Optional[str]]] = None,
               pythonpath: Sequence[str] = ()) -> Dict[str, str]:
    """os.environ + *env* (None values remove a variable), with the *pythonpath*
    entries (e.g. the directory holding your app) prepended to PYTHONPATH and
    PYTHONUNBUFFERED=1 unless set."""
    merged = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    front = [os.fspath(p) for p in pythonpath]
    parts = front + [p for p in merged.get('PYTHONPATH', '').split(os.pathsep)
                     if p and p not in front]
    merged['PYTHONPATH'] = os.pathsep.join(parts)
    merged.setdefault('PYTHONUNBUFFERED', '1')
    return merged


def start_worker(app_module: str, *, hostname: str, concurrency: int = 4,
                 pool: str = 'prefork', extra_args: Sequence[str] = (),
                 env: Optional[Dict[str, Optional[str]]] = None, loglevel: str = 'INFO',
                 log_dir: 'os.PathLike[str] | str', cwd: Optional[str] = None,
                 pythonpath: Sequence[str] = ()) -> 'WorkerProcess':
    """Start ``celery -A app_module worker`` and return the (started) WorkerProcess.

    The log goes to ``log_dir/<hostname>.log`` (a numeric suffix when taken); the
    working directory is *cwd* or *log_dir*; TMPDIR defaults to ``log_dir/tmp``.
    *env* entries override os.environ (a None value removes a variable); *pythonpath*
    entries are prepended to PYTHONPATH (see worker_env).
    Call ``wait_ready()`` on the result.
    """
    log_dir = os.fspath(log_dir)
    os.makedirs(log_dir, exist_ok=True)
    base = os.path.join(log_dir, _safe_name(hostname))
    log_path, n = base + '.log', 1
    while os.path.exists(log_path):
        log_path, n = '%s-%d.log' % (base, n), n + 1
    env = dict(env or {})
    if 'TMPDIR' not in env:
        # billiard's pymp-* temp directory is left behind when a worker is SIGKILLed:
        # keep such leftovers inside log_dir
        env['TMPDIR'] = os.path.join(log_dir, 'tmp')
        os.makedirs(env['TMPDIR'], exist_ok=True)
    cmd = [sys.executable, '-m', 'celery', '-A', app_module, 'worker',
           '-n', hostname, '-c', str(concurrency), '-P', pool,
           '--without-gossip', '--without-mingle', '--without-heartbeat',
           '-l', str(loglevel), *extra_args]
    proc = WorkerProcess(cmd, hostname=hostname, log_path=log_path, env=worker_env(env, pythonpath),
                         loglevel=loglevel, cwd=cwd or log_dir)
    return proc.start()
