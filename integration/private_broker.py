"""Private broker nodes, for tests that stop and restart their broker.

The machine's RabbitMQ (5672) and Redis (6379) are shared by every test run and by
everyone else on the machine: no test may ever stop them. A test that restarts its
broker runs one of its own instead, on free ports, with all its state in a directory
of its own, so a restart on that directory finds the durable queues and persistent
messages the node had::

    node = PrivateRabbitMQ(tmp_path / 'rabbit')   # or PrivateRedis(...)
    node.start(); node.wait_ready()
    ... node.url ...
    node.restart()        # graceful stop, start again on the same data
    node.close()          # stop and remove the directory

* :class:`PrivateRabbitMQ`: a second node of the installed ``rabbitmq-server``
  (``RABBITMQ_NODENAME=mutex-test-<random>@localhost``) whose config, environment file,
  Erlang cookie (``HOME``), Mnesia, logs and plugins list (empty: no management plugin)
  all live in its directory; AMQP and Erlang distribution on free loopback ports. It
  shares the machine's ``epmd``, which is left alone (other nodes use it).
* :class:`PrivateRedis`: ``redis-server`` with an append-only file fsynced on every
  write, so a graceful restart keeps every message it had.

``stop()`` is graceful (SIGTERM: both servers write their data and exit), ``kill()`` is a
crash. Every server started here is killed when this Python process exits (atexit; and,
when started from the main thread, through the kernel's parent-death signal, so not even
a SIGKILLed test run leaves one behind). Only the standard library is used.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

from integration.zkserver import _pdeathsig_prefix, find_free_ports

__all__ = ['BrokerNodeError', 'PrivateRabbitMQ', 'PrivateRedis']

# Debian runs the real scripts from here; /usr/sbin's wrappers su to the rabbitmq user
# and cd into the system node's directory, which a private node must not touch.
_RABBITMQ_DIRS = ('/usr/lib/rabbitmq/bin',)


class BrokerNodeError(RuntimeError):
    """A private broker did not start, or did not answer in time."""


_LIVE = set()
_LOCK = threading.Lock()


def _cleanup_at_exit():
    me = os.getpid()
    with _LOCK:
        nodes = [n for n in _LIVE if n._owner_pid == me]
    for node in nodes:
        node.kill()
        if node.remove_dir:
            shutil.rmtree(node.dir, ignore_errors=True)


atexit.register(_cleanup_at_exit)


def _port_open(port, timeout=0.5):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout):
            return True
    except OSError:
        return False


class _Node:
    """One broker process in its own process group, logging into its directory."""

    log_name = 'server.log'

    def __init__(self, base_dir, *, remove_dir=True):
        self.dir = os.path.abspath(base_dir)
        self.remove_dir = remove_dir
        self._proc = None
        self._owner_pid = None
        os.makedirs(self.dir, exist_ok=True)

    @property
    def log_path(self):
        return os.path.join(self.dir, self.log_name)

    def command(self):
        raise NotImplementedError

    def env(self):
        return dict(os.environ)

    def start(self):
        """Start the server (returns at once; see wait_ready). No-op if it runs."""
        if self.is_running():
            return self
        with open(self.log_path, 'ab') as log:
            log.write(('--- %s starting\n' % time.strftime('%Y-%m-%d %H:%M:%S')).encode())
            log.flush()
            self._proc = subprocess.Popen(
                _pdeathsig_prefix() + self.command(), cwd=self.dir, env=self.env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True)
        self._owner_pid = os.getpid()
        with _LOCK:
            _LIVE.add(self)
        return self

    def is_running(self):
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout=60):
        """Graceful stop (SIGTERM), SIGKILL after ``timeout``; the data stays."""
        if self.is_running():
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget()

    def kill(self):
        """SIGKILL the whole process group (a crash)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._forget()

    def restart(self, timeout=90):
        self.stop()
        self.start()
        self.wait_ready(timeout)
        return self

    def close(self):
        self.stop(timeout=20)
        if self.remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _forget(self):
        with _LOCK:
            _LIVE.discard(self)

    def _check_alive(self, what):
        if not self.is_running():
            raise BrokerNodeError('%s exited (rc=%s) before %s:\n%s' % (
                self, self._proc.returncode if self._proc else None, what, self.log_tail()))

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, 'rb') as f:
                text = f.read().decode('utf-8', 'replace')
        except OSError:
            return ''
        return '\n'.join(text.splitlines()[-lines:])


class PrivateRabbitMQ(_Node):
    """A RabbitMQ node of its own (guest/guest on loopback, no plugins)."""

    def __init__(self, base_dir, **kwargs):
        super().__init__(base_dir, **kwargs)
        self.nodename = 'mutex-test-%s@localhost' % uuid.uuid4().hex[:8]
        self.port, self.dist_port = find_free_ports(2)
        scripts = [d for d in _RABBITMQ_DIRS if os.path.isfile(os.path.join(d, 'rabbitmq-server'))]
        self._server = os.path.join(scripts[0], 'rabbitmq-server') if scripts \
            else shutil.which('rabbitmq-server')
        self._ctl = os.path.join(scripts[0], 'rabbitmqctl') if scripts \
            else shutil.which('rabbitmqctl')
        if not self._server or not self._ctl:
            raise BrokerNodeError('rabbitmq-server is not installed (apt-get install '
                                  'rabbitmq-server)')
        with open(os.path.join(self.dir, 'rabbitmq.conf'), 'w', encoding='utf-8') as f:
            f.write('listeners.tcp.1 = 127.0.0.1:%d\n' % self.port)
        with open(os.path.join(self.dir, 'enabled_plugins'), 'w', encoding='utf-8') as f:
            f.write('[].\n')
        open(os.path.join(self.dir, 'rabbitmq-env.conf'), 'w').close()

    @property
    def url(self):
        return 'amqp://guest:guest@127.0.0.1:%d//' % self.port

    def env(self):
        d = self.dir
        env = dict(os.environ)
        env.update({
            'HOME': d,  # the Erlang cookie of this node and its rabbitmqctl
            'RABBITMQ_NODENAME': self.nodename,
            'RABBITMQ_NODE_PORT': str(self.port),
            'RABBITMQ_DIST_PORT': str(self.dist_port),
            # /etc/rabbitmq's files name the system node and its port: not read
            'RABBITMQ_CONF_ENV_FILE': os.path.join(d, 'rabbitmq-env.conf'),
            'RABBITMQ_CONFIG_FILE': os.path.join(d, 'rabbitmq.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(d, 'advanced.config'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(d, 'enabled_plugins'),
            'RABBITMQ_MNESIA_BASE': os.path.join(d, 'mnesia'),
            'RABBITMQ_LOG_BASE': os.path.join(d, 'log'),
            'RABBITMQ_PLUGINS_EXPAND_DIR': os.path.join(d, 'plugins-expand'),
            'RABBITMQ_PID_FILE': os.path.join(d, 'rabbit.pid'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
                '-kernel inet_dist_use_interface {127,0,0,1}',
            # the script then execs the VM instead of staying its parent, so the
            # parent-death signal and SIGTERM reach the VM itself
            'RUNNING_UNDER_SYSTEMD': 'true',
        })
        return env

    def command(self):
        return [self._server]

    def ctl(self, *args, timeout=60):
        """``rabbitmqctl -n NODE ARGS`` (returncode, output)."""
        env = self.env()
        # the CLI's own distribution port (default: ours + 10000, which may pass 65535)
        port = str(find_free_ports(1)[0])
        env.update(RABBITMQ_CTL_DIST_PORT_MIN=port, RABBITMQ_CTL_DIST_PORT_MAX=port)
        try:
            proc = subprocess.run([self._ctl, '-n', self.nodename, *args], env=env,
                                  cwd=self.dir, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, 'rabbitmqctl %s: no answer after %ss' % (' '.join(args), timeout)
        return proc.returncode, proc.stdout.decode('utf-8', 'replace')

    def wait_ready(self, timeout=90):
        """Until ``rabbitmqctl await_startup`` succeeds and the AMQP port accepts."""
        deadline = time.monotonic() + timeout
        last = ''
        while True:
            self._check_alive('serving')
            left = deadline - time.monotonic()
            if _port_open(self.port):
                rc, last = self.ctl('await_startup', '--timeout', str(int(max(left, 1))),
                                    timeout=max(left, 1) + 15)
                if rc == 0:
                    return self
            if time.monotonic() >= deadline:
                raise BrokerNodeError('%s not ready after %.0f s:\n%s\n%s' % (
                    self, timeout, last[-2000:], self.log_tail()))
            time.sleep(0.2)

    def log_tail(self, lines=40):
        tail = super().log_tail(lines)
        try:  # the node's own log says why it stopped
            with open(os.path.join(self.dir, 'log', self.nodename + '.log'), 'rb') as f:
                node_log = f.read().decode('utf-8', 'replace').splitlines()[-lines:]
        except OSError:
            node_log = []
        return '\n'.join([tail] + node_log)

    def __repr__(self):
        return '<PrivateRabbitMQ %s on %d>' % (self.nodename, self.port)


class PrivateRedis(_Node):
    """A redis-server of its own whose append-only file survives restarts."""

    def __init__(self, base_dir, **kwargs):
        super().__init__(base_dir, **kwargs)
        self.port = find_free_ports(1)[0]
        self._server = shutil.which('redis-server')
        if self._server is None:
            raise BrokerNodeError('redis-server is not installed (apt-get install '
                                  'redis-server)')

    @property
    def url(self):
        return 'redis://127.0.0.1:%d/0' % self.port

    def command(self):
        return [self._server, '--port', str(self.port), '--bind', '127.0.0.1',
                '--dir', self.dir, '--appendonly', 'yes', '--appendfsync', 'always',
                '--save', '', '--daemonize', 'no', '--protected-mode', 'yes']

    def ping(self, timeout=0.5):
        try:
            with socket.create_connection(('127.0.0.1', self.port), timeout=timeout) as s:
                s.sendall(b'PING\r\n')
                return s.recv(64).startswith(b'+PONG')
        except OSError:
            return False

    def wait_ready(self, timeout=30):
        """Until PING answers PONG (after the append-only file was loaded)."""
        deadline = time.monotonic() + timeout
        while not self.ping():
            self._check_alive('answering PING')
            if time.monotonic() >= deadline:
                raise BrokerNodeError('%s not answering PING after %.0f s:\n%s' % (
                    self, timeout, self.log_tail()))
            time.sleep(0.05)
        return self

    def __repr__(self):
        return '<PrivateRedis on %d>' % self.port
