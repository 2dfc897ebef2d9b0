"""The harness's private ZooKeeper servers: :mod:`celery_mutex_bootstep.testing` (where
the server code lives, for users' tests too) plus a CLI for detached nodes, which
outlive it on purpose::

    python -m integration.zkserver start --dir DIR [--port P] [--tick-time T]
    python -m integration.zkserver status --dir DIR
    python -m integration.zkserver stop --dir DIR

A detached node writes its pid to ``DIR/zk.pid``.
"""

import argparse
import os
import signal
import sys
import time

import psutil

from celery_mutex_bootstep.testing.ensemble import ZooKeeperEnsemble
from celery_mutex_bootstep.testing.zookeeper import (  # noqa: F401  (the harness's names)
    CFG_NAME, ZOOKEEPER_JAR, ZooKeeperError, ZooKeeperNode, _four_letter, _parse_mntr,
    _parse_mode, _pdeathsig_prefix, find_free_port, find_free_ports, standalone)

__all__ = [
    'ZOOKEEPER_JAR',
    'ZooKeeperEnsemble',
    'ZooKeeperError',
    'ZooKeeperNode',
    'find_free_port',
    'find_free_ports',
    'standalone',
]

PID_NAME = 'zk.pid'


def _pid_alive(pid):
    """True if *pid* exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _pid_cmdline(pid):
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


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
