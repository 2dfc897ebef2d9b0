"""Private ZooKeeper servers for the integration tests, the demo and the benchmarks.

Each :class:`ZooKeeperNode` is one ZooKeeper JVM (Debian's ``zookeeper`` package,
``org.apache.zookeeper.server.quorum.QuorumPeerMain``) with its own directory::

    DIR/zoo.cfg          written on every start()
    DIR/data/            dataDir (and data/myid for ensemble members)
    DIR/zookeeper.log    the JVM's stdout and stderr (appended across restarts)
    DIR/zk.pid           only for nodes started by the CLI

:class:`ZooKeeperEnsemble` runs ``n`` such nodes as one quorum on 127.0.0.1, and
:func:`standalone` returns a started, ready standalone node in a temporary directory.

Fault injection: ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``pause()``/``resume()``
(SIGSTOP/SIGCONT, i.e. a frozen server), ``restart()`` (same port, same data).

Every JVM started through this module by a Python process is killed when that process
exits (atexit; and, when started from the main thread, also through the kernel's
parent-death signal via ``setpriv --pdeathsig``, so not even a SIGKILLed test run leaves
JVMs behind). Nodes started by the CLI are detached and outlive it on purpose::

    python -m integration.zkserver start --dir DIR [--port P] [--tick-time T]
    python -m integration.zkserver status --dir DIR
    python -m integration.zkserver stop --dir DIR

Only the standard library is used. Environment overrides: ``JAVA`` (java binary),
``ZOOKEEPER_CLASSPATH`` (the whole ``-cp`` value), ``ZKSERVER_NO_PDEATHSIG=1``.
"""

import argparse
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

__all__ = [
    'ZOOKEEPER_JAR',
    'ZooKeeperEnsemble',
    'ZooKeeperError',
    'ZooKeeperNode',
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

def find_free_port(host='127.0.0.1'):
    """Return a TCP port on *host* that was free a moment ago."""
    return find_free_ports(1, host)[0]


def find_free_ports(n, host='127.0.0.1'):
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

def _pid_alive(pid):
    """True if *pid* exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # the state field follows the parenthesised command name
    state = stat[stat.rfind(b')') + 2:stat.rfind(b')') + 3]
    return state not in (b'Z', b'X', b'')


def _pid_cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return [a.decode('utf-8', 'replace') for a in f.read().split(b'\0') if a]
    except OSError:
        return []


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

    def __init__(self, base_dir, client_port=None, *, tick_time=500, init_limit=10,
                 sync_limit=5, min_session_timeout=None, max_session_timeout=None,
                 server_id=None, servers=None, extra_config=None, remove_dir=False,
                 detached=False):
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
    def hosts(self):
        """Connection string for this node alone: '127.0.0.1:PORT'."""
        return '127.0.0.1:%d' % self.client_port

    @property
    def pid(self):
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
    def start(self):
        """Start the JVM (returns at once; see wait_ready). No-op if already running."""
        if self.is_running():
            return self
        if not os.path.exists(ZOOKEEPER_JAR) and not os.environ.get('ZOOKEEPER_CLASSPATH'):
            raise ZooKeeperError('%s is missing: run scripts/ensure-zookeeper.sh' % ZOOKEEPER_JAR)
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

    def wait_ready(self, timeout=30):
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

    def stop(self, timeout=10):
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

    def kill(self):
        """SIGKILL the JVM (an abrupt crash) and reap it."""
        self._hard_kill()

    def restart(self, wait=True, timeout=30):
        """stop() then start() on the same port with the same data directory."""
        self.stop()
        self.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def pause(self):
        """SIGSTOP: the server freezes (connections stay open, nothing is answered)."""
        self._send(signal.SIGSTOP)

    def resume(self):
        """SIGCONT after pause()."""
        self._send(signal.SIGCONT)

    def close(self):
        """stop() and, for a temporary node (standalone() without base_dir), remove its dir."""
        self.stop()
        if self.remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _REGISTRY_LOCK:
                _TEMP_DIRS.pop(self.dir, None)

    def is_running(self):
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
    def four_letter(self, cmd, timeout=PROBE_TIMEOUT):
        """Send a four-letter word ('srvr', 'mntr', 'stat', 'ruok', 'cons', ...) and
        return the answer text. Raises OSError if the server does not answer."""
        return _four_letter(self.client_port, cmd, timeout)

    def mode(self):
        """'standalone', 'leader', 'follower' (or 'observer'); None when not serving."""
        try:
            return _parse_mode(self.four_letter('srvr'))
        except OSError:
            return None

    def mntr(self):
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


# --------------------------------------------------------------------------- ensemble

class ZooKeeperEnsemble:
    """*n* ZooKeeper nodes forming one quorum on 127.0.0.1.

    Node *i* (server id i+1) lives in ``base_dir/node<i+1>``; a temporary *base_dir*
    is made (and removed by close()) when none is given.
    """

    def __init__(self, n=3, base_dir=None, *, tick_time=500, init_limit=10, sync_limit=5,
                 min_session_timeout=None, max_session_timeout=None, extra_config=None):
        if n < 1:
            raise ValueError('n must be >= 1')
        self._temp = base_dir is None
        self.dir = os.path.abspath(tempfile.mkdtemp(prefix='zk-ensemble-')
                                   if base_dir is None else base_dir)
        os.makedirs(self.dir, exist_ok=True)
        if self._temp:
            with _REGISTRY_LOCK:
                _TEMP_DIRS[self.dir] = os.getpid()
        ports = find_free_ports(3 * n)
        servers = [(i + 1, ports[n + i], ports[2 * n + i]) for i in range(n)]
        self.nodes = [
            ZooKeeperNode(
                os.path.join(self.dir, 'node%d' % (i + 1)), ports[i],
                tick_time=tick_time, init_limit=init_limit, sync_limit=sync_limit,
                min_session_timeout=min_session_timeout,
                max_session_timeout=max_session_timeout,
                server_id=i + 1, servers=servers if n > 1 else (),
                extra_config=extra_config)
            for i in range(n)
        ]

    @property
    def hosts(self):
        """'127.0.0.1:P1,127.0.0.1:P2,...' for a client of the whole ensemble."""
        return ','.join(node.hosts for node in self.nodes)

    def start(self):
        for node in self.nodes:
            node.start()
        return self

    def wait_ready(self, timeout=30):
        """Wait until every running node serves and one of them is the leader."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.is_running()]
            if not running:
                raise ZooKeeperError('no ensemble node is running')
            modes = [n.mode() for n in running]
            if all(m is not None for m in modes) and (
                    'leader' in modes or modes == ['standalone']):
                return self
            if time.monotonic() >= deadline:
                raise ZooKeeperError('ensemble not serving after %.0f s (modes %s):\n%s' % (
                    timeout, modes, '\n'.join(
                        '--- node %d\n%s' % (n.server_id, n.log_tail(15)) for n in self.nodes)))
            time.sleep(0.05)

    def modes(self):
        """{server_id: mode or None} for every node."""
        return {n.server_id: n.mode() for n in self.nodes}

    def leader(self):
        """The node currently in mode 'leader' (None if there is none right now)."""
        for node in self.nodes:
            if node.is_running() and node.mode() == 'leader':
                return node
        return None

    def followers(self):
        return [n for n in self.nodes if n.is_running() and n.mode() == 'follower']

    def wait_for_leader(self, timeout=30, exclude=()):
        """Wait until some node (not in *exclude*) is leader; return it."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None and leader not in exclude:
                return leader
            if time.monotonic() >= deadline:
                raise ZooKeeperError('no leader after %.0f s (modes %s)' % (timeout, self.modes()))
            time.sleep(0.05)

    def stop(self, timeout=10):
        for node in self.nodes:
            node._send(signal.SIGTERM)
            node._send(signal.SIGCONT)
        for node in self.nodes:
            node.stop(timeout)

    def kill(self):
        for node in self.nodes:
            node.kill()

    def close(self):
        """stop() and remove the directory if it is a temporary one."""
        self.stop()
        if self._temp:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _REGISTRY_LOCK:
                _TEMP_DIRS.pop(self.dir, None)

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self):
        return len(self.nodes)

    def __getitem__(self, i):
        return self.nodes[i]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return '<ZooKeeperEnsemble %s dir=%s>' % (self.hosts, self.dir)


def standalone(base_dir=None, port=None, tick_time=500, *, timeout=30, **kwargs):
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


# --------------------------------------------------------------------------- CLI

def _read_cfg(directory):
    cfg = {}
    try:
        with open(os.path.join(directory, CFG_NAME), encoding='utf-8') as f:
            for line in f:
                key, sep, value = line.strip().partition('=')
                if sep and not key.startswith('#'):
                    cfg[key.strip()] = value.strip()
    except OSError:
        pass
    return cfg


def _cli_pid(directory):
    """The pid in DIR/zk.pid if that process is alive and is this dir's JVM, else None."""
    try:
        with open(os.path.join(directory, PID_NAME), encoding='ascii') as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if not _pid_alive(pid):
        return None
    if os.path.join(directory, CFG_NAME) not in _pid_cmdline(pid):
        return None  # the pid was reused by some other process
    return pid


def _cli_start(args):
    directory = os.path.abspath(args.dir)
    os.makedirs(directory, exist_ok=True)
    cfg = _read_cfg(directory)
    pid = _cli_pid(directory)
    if pid is not None:
        port = int(cfg['clientPort'])
        if args.port and args.port != port:
            print('a node already runs in %s on port %d (pid %d)' % (directory, port, pid),
                  file=sys.stderr)
            return 1
        deadline = time.monotonic() + args.timeout
        while _parse_mode_safe(port) is None:
            if time.monotonic() >= deadline or not _pid_alive(pid):
                print('node in %s (pid %d) is not serving' % (directory, pid), file=sys.stderr)
                return 1
            time.sleep(0.05)
        print('127.0.0.1:%d' % port)
        return 0
    port = args.port or (int(cfg['clientPort']) if 'clientPort' in cfg else None)
    tick_time = args.tick_time or int(cfg.get('tickTime', 500))
    node = ZooKeeperNode(directory, port, tick_time=tick_time, detached=True)
    node.start()
    try:
        node.wait_ready(args.timeout)
    except ZooKeeperError as exc:
        node.kill()
        print(str(exc), file=sys.stderr)
        return 1
    with open(os.path.join(directory, PID_NAME), 'w', encoding='ascii') as f:
        f.write('%d\n' % node.pid)
    node._proc.returncode = 0  # detached on purpose: no "still running" warning
    print(node.hosts)
    return 0


def _parse_mode_safe(port):
    try:
        return _parse_mode(_four_letter(port, 'srvr'))
    except OSError:
        return None


def _cli_stop(args):
    directory = os.path.abspath(args.dir)
    pid = _cli_pid(directory)
    pid_file = os.path.join(directory, PID_NAME)
    if pid is None:
        print('not running', file=sys.stderr)
        if os.path.exists(pid_file):
            os.unlink(pid_file)
        return 0
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    if os.path.exists(pid_file):
        os.unlink(pid_file)
    return 0


def _cli_status(args):
    """Exit 0: serving; 1: process alive but not serving; 3: not running."""
    directory = os.path.abspath(args.dir)
    pid = _cli_pid(directory)
    if pid is None:
        print('stopped')
        return 3
    port = int(_read_cfg(directory).get('clientPort', 0))
    mode = _parse_mode_safe(port)
    print('running pid=%d hosts=127.0.0.1:%d mode=%s' % (pid, port, mode or 'none'))
    return 0 if mode else 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m integration.zkserver',
        description='Run a detached private standalone ZooKeeper server.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('start', help='start (if needed), wait until serving, print hosts')
    p.add_argument('--dir', required=True)
    p.add_argument('--port', type=int, default=None)
    p.add_argument('--tick-time', type=int, default=None, help='default 500 ms')
    p.add_argument('--timeout', type=float, default=30.0)
    p.set_defaults(func=_cli_start)
    p = sub.add_parser('stop', help='stop the node started in DIR')
    p.add_argument('--dir', required=True)
    p.add_argument('--timeout', type=float, default=10.0)
    p.set_defaults(func=_cli_stop)
    p = sub.add_parser('status', help='exit 0 serving, 1 not serving, 3 stopped')
    p.add_argument('--dir', required=True)
    p.set_defaults(func=_cli_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
