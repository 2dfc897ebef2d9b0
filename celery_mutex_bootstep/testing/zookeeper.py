"""Private ZooKeeper servers for tests: one standalone JVM per :class:`ZooKeeperServer`.

Each server is one ZooKeeper JVM (Debian's ``zookeeper`` package,
``org.apache.zookeeper.server.quorum.QuorumPeerMain``) with its own directory::

    DIR/zoo.cfg          written on every start()
    DIR/data/            dataDir (and data/myid for ensemble members)
    DIR/zookeeper.log    the JVM's stdout and stderr (appended across restarts)

:func:`standalone` returns a started, ready server in a temporary directory on a free
port; :class:`~celery_mutex_bootstep.testing.ensemble.ZooKeeperEnsemble` runs several as
one quorum.

Fault injection: ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``pause()``/``resume()``
(SIGSTOP/SIGCONT, i.e. a frozen server), ``restart()`` (same port, same data).

Every JVM started through this module is killed when the Python process that started it
exits (atexit; and, when started from the main thread, also through the kernel's
parent-death signal via ``setpriv --pdeathsig``, so not even a SIGKILLed test run leaves
JVMs behind), unless it was started with ``detached=True``.

Only the standard library is used. Environment overrides: ``JAVA`` (java binary),
``ZOOKEEPER_CLASSPATH`` (the whole ``-cp`` value), ``ZKSERVER_NO_PDEATHSIG=1``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

__all__ = [
    'ZOOKEEPER_JAR',
    'ZooKeeperError',
    'ZooKeeperNode',
    'ZooKeeperServer',
    'find_free_port',
    'find_free_ports',
    'standalone',
]


ZOOKEEPER_JAR = '/usr/share/java/zookeeper.jar'
# /etc/zookeeper/conf holds log4j.properties; the two logging jars are not on the
# zookeeper.jar manifest's Class-Path, and without them ZooKeeper logs nothing.
DEFAULT_CLASSPATH = (
    '/etc/zookeeper/conf',
    ZOOKEEPER_JAR,
    '/usr/share/java/slf4j-log4j12.jar',
    '/usr/share/java/log4j-1.2.jar',
    # TLS (NettyServerCnxnFactory) also needs these two, missing from the manifest.
    '/usr/share/java/netty-codec.jar',
    '/usr/share/java/netty-resolver.jar',
)
MAIN_CLASS = 'org.apache.zookeeper.server.quorum.QuorumPeerMain'
LOG_NAME = 'zookeeper.log'
PID_NAME = 'zk.pid'
CFG_NAME = 'zoo.cfg'
PROBE_TIMEOUT = 0.5  # seconds per four-letter-word probe: an early probe can hang


class ZooKeeperError(RuntimeError):
    """A ZooKeeper JVM did not start, died, or did not become ready in time."""


# --------------------------------------------------------------------------- ports

def find_free_port(host: str = '127.0.0.1') -> int:
    """Return a TCP port on *host* that was free a moment ago."""
    return find_free_ports(1, host)[0]


def find_free_ports(n: int, host: str = '127.0.0.1') -> List[int]:
    """Return *n* distinct TCP ports that were free a moment ago.

    All sockets are held open until every port is chosen, so the ports are distinct.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _four_letter(port, cmd, timeout=PROBE_TIMEOUT, host='127.0.0.1'):
    """Send a four-letter word and return the whole answer (raises OSError)."""
    deadline = time.monotonic() + max(timeout * 4, 2.0)
    chunks = []
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(cmd.encode('ascii'))
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            if time.monotonic() > deadline:
                raise socket.timeout('four-letter word %r answer did not end' % cmd)
    return b''.join(chunks).decode('utf-8', 'replace')


def _parse_mode(text):
    m = re.search(r'^Mode: *(\S+)', text, re.M)
    return m.group(1) if m else None


def _parse_mntr(text):
    out = {}
    for line in text.splitlines():
        if '\t' not in line:
            continue
        key, _, value = line.partition('\t')
        value = value.strip()
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


# --------------------------------------------------------------------------- process helpers

def _pdeathsig_prefix():
    """Return ['setpriv', '--pdeathsig', 'KILL'] when it is safe and available.

    The kernel's parent-death signal fires when the *thread* that forked the child exits,
    so it is only used from the main thread (which lives as long as the process).
    """
    if os.environ.get('ZKSERVER_NO_PDEATHSIG') or not sys.platform.startswith('linux'):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which('setpriv')
    return [setpriv, '--pdeathsig', 'KILL'] if setpriv else []


def _tail(path, lines=40):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    return '\n'.join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- exit cleanup

_LIVE = set()          # nodes whose JVM was started (not detached) by this process
_TEMP_DIRS = {}        # path -> pid of the process that created it
_REGISTRY_LOCK = threading.Lock()


def _cleanup_at_exit():
    me = os.getpid()
    with _REGISTRY_LOCK:
        nodes = [n for n in _LIVE if n._owner_pid == me]
        dirs = [d for d, pid in _TEMP_DIRS.items() if pid == me]
    for node in nodes:
        node._hard_kill()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_at_exit)


# --------------------------------------------------------------------------- one node

class ZooKeeperNode:
    """One ZooKeeper JVM with its own directory.

    *base_dir* is created if needed. *client_port* defaults to a free port.
    For an ensemble member pass *server_id* and *servers* (a list of
    ``(id, quorum_port, election_port)``); :class:`ZooKeeperEnsemble` does that.
    *extra_config* is a dict of further zoo.cfg keys.
    """

    def __init__(self, base_dir: 'os.PathLike[str] | str', client_port: Optional[int] = None,
                 *, tick_time: int = 500, init_limit: int = 10, sync_limit: int = 5,
                 min_session_timeout: Optional[int] = None,
                 max_session_timeout: Optional[int] = None, server_id: Optional[int] = None,
                 servers=None, extra_config: Optional[Dict[str, object]] = None,
                 remove_dir: bool = False, detached: bool = False) -> None:
        self.dir = os.path.abspath(base_dir)
        self.client_port = int(client_port) if client_port else find_free_port()
        self.tick_time = int(tick_time)
        self.init_limit = int(init_limit)
        self.sync_limit = int(sync_limit)
        self.min_session_timeout = min_session_timeout
        self.max_session_timeout = max_session_timeout
        self.server_id = server_id
        self.servers = list(servers or ())
        self.extra_config = dict(extra_config or {})
        self.remove_dir = remove_dir      # rmtree the directory on close()
        self.detached = detached          # survives this Python process (CLI)
        self._proc = None
        self._owner_pid = None
        os.makedirs(self.data_dir, exist_ok=True)
        if remove_dir:
            with _REGISTRY_LOCK:
                _TEMP_DIRS[self.dir] = os.getpid()

    # ----------------------------------------------------------------- paths & config
    @property
    def data_dir(self):
        return os.path.join(self.dir, 'data')

    @property
    def config_path(self):
        return os.path.join(self.dir, CFG_NAME)

    @property
    def log_path(self):
        return os.path.join(self.dir, LOG_NAME)

    @property
    def hosts(self) -> str:
        """Connection string for this node alone: '127.0.0.1:PORT'."""
        return '127.0.0.1:%d' % self.client_port

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def config_text(self):
        cfg = [
            ('tickTime', self.tick_time),
            ('initLimit', self.init_limit),
            ('syncLimit', self.sync_limit),
            ('dataDir', self.data_dir),
            ('clientPort', self.client_port),
            ('clientPortAddress', '127.0.0.1'),
            ('maxClientCnxns', 0),
            ('4lw.commands.whitelist', '*'),
            ('admin.enableServer', 'false'),
            ('forceSync', 'no'),
        ]
        if self.min_session_timeout is not None:
            cfg.append(('minSessionTimeout', int(self.min_session_timeout)))
        if self.max_session_timeout is not None:
            cfg.append(('maxSessionTimeout', int(self.max_session_timeout)))
        for sid, quorum_port, election_port in self.servers:
            cfg.append(('server.%d' % sid, '127.0.0.1:%d:%d' % (quorum_port, election_port)))
        cfg.extend(self.extra_config.items())
        return ''.join('%s=%s\n' % kv for kv in cfg)

    def write_config(self):
        os.makedirs(self.data_dir, exist_ok=True)
        with open(self.config_path, 'w', encoding='utf-8') as f:
            f.write(self.config_text())
        if self.server_id is not None:
            with open(os.path.join(self.data_dir, 'myid'), 'w', encoding='ascii') as f:
                f.write('%d\n' % self.server_id)

    def command(self):
        java = os.environ.get('JAVA') or shutil.which('java') or 'java'
        classpath = os.environ.get('ZOOKEEPER_CLASSPATH') or ':'.join(DEFAULT_CLASSPATH)
        return [
            java, '-Xmx128m', '-XX:+UseSerialGC',
            '-XX:-UsePerfData',  # no hsperfdata_<user>/<pid> file left in the temp dir by a killed JVM
            '-Dzookeeper.root.logger=INFO,CONSOLE',
            '-Dzookeeper.log.dir=%s' % self.dir,
            '-cp', classpath, MAIN_CLASS, self.config_path,
        ]

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> 'ZooKeeperNode':
        """Start the JVM (returns at once; see wait_ready). No-op if already running."""
        if self.is_running():
            return self
        if not os.path.exists(ZOOKEEPER_JAR) and not os.environ.get('ZOOKEEPER_CLASSPATH'):
            raise ZooKeeperError('%s is missing: install Debian\'s zookeeper package '
                                 '(apt-get install zookeeper) or set ZOOKEEPER_CLASSPATH'
                                 % ZOOKEEPER_JAR)
        self.write_config()
        cmd = self.command()
        if not self.detached:
            cmd = _pdeathsig_prefix() + cmd
        with open(self.log_path, 'ab') as log:
            log.write(('--- %s starting: %s\n' % (time.strftime('%Y-%m-%d %H:%M:%S'),
                                                  ' '.join(cmd))).encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
        self._owner_pid = os.getpid()
        if not self.detached:
            with _REGISTRY_LOCK:
                _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 30) -> str:
        """Wait until ``srvr`` answers a ``Mode:`` line; return the mode."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise ZooKeeperError('ZooKeeper on port %d exited (rc=%s) before serving:\n%s' % (
                    self.client_port, self.returncode, self.log_tail()))
            mode = self.mode()
            if mode is not None:
                return mode
            if time.monotonic() >= deadline:
                raise ZooKeeperError('ZooKeeper on port %d not serving after %.0f s:\n%s' % (
                    self.client_port, timeout, self.log_tail()))
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM and wait (SIGKILL after *timeout*). The directory is kept, so a later
        start() resumes with the same data; close() also removes a temporary directory."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._send(signal.SIGTERM)
            self._send(signal.SIGCONT)   # a paused JVM cannot act on SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._hard_kill()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the JVM (an abrupt crash) and reap it."""
        self._hard_kill()

    def restart(self, wait: bool = True, timeout: float = 30) -> 'ZooKeeperNode':
        """stop() then start() on the same port with the same data directory."""
        self.stop()
        self.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def pause(self) -> None:
        """SIGSTOP: the server freezes (connections stay open, nothing is answered)."""
        self._send(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._send(signal.SIGCONT)

    def close(self) -> None:
        """stop() and, for a temporary node (standalone() without base_dir), remove its dir."""
        self.stop()
        if self.remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _REGISTRY_LOCK:
                _TEMP_DIRS.pop(self.dir, None)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self):
        return self._proc.poll() if self._proc is not None else None

    def _send(self, sig):
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            os.kill(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _hard_kill(self):
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._forget()

    def _forget(self):
        with _REGISTRY_LOCK:
            _LIVE.discard(self)

    # ----------------------------------------------------------------- probes
    def four_letter(self, cmd: str, timeout: float = PROBE_TIMEOUT) -> str:
        """Send a four-letter word ('srvr', 'mntr', 'stat', 'ruok', 'cons', ...) and
        return the answer text. Raises OSError if the server does not answer."""
        return _four_letter(self.client_port, cmd, timeout)

    def mode(self) -> Optional[str]:
        """'standalone', 'leader', 'follower' (or 'observer'); None when not serving."""
        try:
            return _parse_mode(self.four_letter('srvr'))
        except OSError:
            return None

    def mntr(self) -> Dict[str, object]:
        """The ``mntr`` counters as a dict (ints/floats where numeric); {} when not serving."""
        try:
            return _parse_mntr(self.four_letter('mntr'))
        except OSError:
            return {}

    def log_text(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def log_tail(self, lines=40):
        return _tail(self.log_path, lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return '<ZooKeeperNode %s%s pid=%s dir=%s>' % (
            self.hosts, '' if self.server_id is None else ' id=%d' % self.server_id,
            self.pid, self.dir)


#: The name users look for (as in kazoo.testing); one node is one server.
ZooKeeperServer = ZooKeeperNode


def standalone(base_dir: 'os.PathLike[str] | str | None' = None, port: Optional[int] = None,
               tick_time: int = 500, *, timeout: float = 30, **kwargs) -> ZooKeeperNode:
    """Start a standalone node and wait until it serves; return it.

    With *base_dir* None the node lives in a temporary directory that close() (or the
    exit of this process) removes; stop() keeps it so stop()+start() keeps the data.
    Further keyword arguments go to :class:`ZooKeeperNode`.
    """
    temp = base_dir is None
    if temp:
        base_dir = tempfile.mkdtemp(prefix='zk-')
    node = ZooKeeperNode(base_dir, port, tick_time=tick_time, remove_dir=temp, **kwargs)
    try:
        node.start()
        node.wait_ready(timeout)
    except BaseException:
        node.close()
        raise
    return node
