"""Make sure the local RabbitMQ and Redis used by the integration tests and the demo run.

``ensure_rabbitmq()`` / ``ensure_redis()`` return the broker URL. If the service does not
answer they start it (installing the Debian package with apt-get first when the binary is
missing: root and a reachable Debian mirror are needed for that) and record it in
``STARTED``, so that the caller can undo exactly what it did with ``stop_started()``.
A service that already ran is never stopped by this module.

No systemd is assumed; processes are listed with psutil.
"""

import os
import shutil
import socket
import subprocess
import time

import psutil

__all__ = [
    'RABBITMQ_URL',
    'REDIS_URL',
    'STARTED',
    'BrokerError',
    'ensure_rabbitmq',
    'ensure_redis',
    'rabbitmq_running',
    'redis_running',
    'stop_started',
]

RABBITMQ_HOST, RABBITMQ_PORT = '127.0.0.1', 5672
REDIS_HOST, REDIS_PORT = '127.0.0.1', 6379
RABBITMQ_URL = 'amqp://guest:guest@127.0.0.1:5672//'
REDIS_URL = 'redis://127.0.0.1:6379/0'

#: Services started by this process, in start order: dicts with 'name' and details.
STARTED = []

_SBIN = ('/usr/local/sbin', '/usr/sbin', '/sbin')


class BrokerError(RuntimeError):
    pass


def _which(name):
    path = os.environ.get('PATH', '') + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def _port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _apt_install(package):
    """apt-get install a Debian package (update first). Raises BrokerError on failure."""
    if os.geteuid() != 0:
        raise BrokerError('%s is not installed and this is not root: apt-get install %s'
                          % (package, package))
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for cmd in (['apt-get', 'update', '-qq'],
                ['apt-get', 'install', '-y', '-qq', '--no-install-recommends', package]):
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise BrokerError('%s failed (rc=%d):\n%s' % (
                ' '.join(cmd), proc.returncode, proc.stdout.decode('utf-8', 'replace')[-4000:]))


def _epmd_pids():
    return {p.pid for p in psutil.process_iter(['name']) if p.info['name'] == 'epmd'}


# --------------------------------------------------------------------------- RabbitMQ

def rabbitmq_running():
    return _port_open(RABBITMQ_HOST, RABBITMQ_PORT)


def ensure_rabbitmq(timeout=60):
    """Return RABBITMQ_URL, starting the local RabbitMQ (guest/guest) if needed."""
    if rabbitmq_running():
        return RABBITMQ_URL
    if _which('rabbitmq-server') is None:
        _apt_install('rabbitmq-server')
        # the package's postinst may have started it already
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if rabbitmq_running():
                return RABBITMQ_URL
            time.sleep(0.5)
    server, ctl = _which('rabbitmq-server'), _which('rabbitmqctl')
    if server is None or ctl is None:
        raise BrokerError('rabbitmq-server/rabbitmqctl not found after installation')
    epmd_before = _epmd_pids()
    proc = subprocess.run([server, '-detached'], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise BrokerError('rabbitmq-server -detached failed (rc=%d):\n%s' % (
            proc.returncode, proc.stdout.decode('utf-8', 'replace')))
    STARTED.append({'name': 'rabbitmq', 'epmd_pids': set()})
    deadline = time.monotonic() + timeout
    last = ''
    while True:
        # an early call exits 69 at once (node not up yet): just loop
        remaining = max(1.0, deadline - time.monotonic())
        try:
            ctl_proc = subprocess.run(
                [ctl, 'await_startup', '--timeout', str(int(min(remaining, 30)))],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=remaining + 10)
            last = ctl_proc.stdout.decode('utf-8', 'replace')
            ok = ctl_proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok and rabbitmq_running():
            break
        if time.monotonic() >= deadline:
            raise BrokerError('RabbitMQ not ready after %.0f s:\n%s' % (timeout, last[-2000:]))
        time.sleep(0.5)
    STARTED[-1]['epmd_pids'] = _epmd_pids() - epmd_before
    return RABBITMQ_URL


def _stop_rabbitmq(info, timeout=60):
    ctl = _which('rabbitmqctl')
    if ctl:
        try:
            subprocess.run([ctl, 'stop'], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # epmd outlives the node: stop the one we caused to start, by its pid
    for pid in info.get('epmd_pids', ()):
        try:
            os.kill(pid, 15)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------- Redis

def redis_running(timeout=0.5):
    """True if 127.0.0.1:6379 answers PING with +PONG."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=timeout) as s:
            s.sendall(b'PING\r\n')
            return s.recv(64).startswith(b'+PONG')
    except OSError:
        return False


def ensure_redis(timeout=20):
    """Return REDIS_URL, starting a local redis-server (no persistence) if needed."""
    if redis_running():
        return REDIS_URL
    if _which('redis-server') is None:
        _apt_install('redis-server')
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if redis_running():
                return REDIS_URL
            time.sleep(0.2)
    server = _which('redis-server')
    if server is None:
        raise BrokerError('redis-server not found after installation')
    proc = subprocess.run(
        [server, '--port', str(REDIS_PORT), '--bind', REDIS_HOST, '--save', '',
         '--appendonly', 'no', '--daemonize', 'yes'],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise BrokerError('redis-server failed (rc=%d):\n%s' % (
            proc.returncode, proc.stdout.decode('utf-8', 'replace')))
    STARTED.append({'name': 'redis'})
    deadline = time.monotonic() + timeout
    while not redis_running():
        if time.monotonic() >= deadline:
            raise BrokerError('redis-server not answering PING after %.0f s' % timeout)
        time.sleep(0.05)
    return REDIS_URL


def _stop_redis(info, timeout=10):
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as s:
            s.sendall(b'SHUTDOWN NOSAVE\r\n')
            s.recv(64)  # the server closes the connection when it exits
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while _port_open(REDIS_HOST, REDIS_PORT) and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------- undo

def stop_started():
    """Stop, in reverse order, every service ensure_*() started; return their names."""
    stopped = []
    while STARTED:
        info = STARTED.pop()
        if info['name'] == 'rabbitmq':
            _stop_rabbitmq(info)
        elif info['name'] == 'redis':
            _stop_redis(info)
        stopped.append(info['name'])
    return stopped


if __name__ == '__main__':
    print(ensure_rabbitmq())
    print(ensure_redis())
    print('started:', [s['name'] for s in STARTED])
