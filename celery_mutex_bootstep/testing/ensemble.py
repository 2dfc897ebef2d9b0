"""Several private ZooKeeper servers on 127.0.0.1 forming one quorum."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from typing import Dict, List, Optional

from .zookeeper import (_REGISTRY_LOCK, _TEMP_DIRS, ZooKeeperError, ZooKeeperNode,
                        find_free_ports)

__all__ = ['ZooKeeperEnsemble']


class ZooKeeperEnsemble:
    """*n* ZooKeeper nodes forming one quorum on 127.0.0.1.

    Node *i* (server id i+1) lives in ``base_dir/node<i+1>``; a temporary *base_dir*
    is made (and removed by close()) when none is given.
    """

    def __init__(self, n: int = 3, base_dir: 'os.PathLike[str] | str | None' = None, *,
                 tick_time: int = 500, init_limit: int = 10, sync_limit: int = 5,
                 min_session_timeout: Optional[int] = None,
                 max_session_timeout: Optional[int] = None,
                 extra_config: Optional[Dict[str, object]] = None) -> None:
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
    def hosts(self) -> str:
        """'127.0.0.1:P1,127.0.0.1:P2,...' for a client of the whole ensemble."""
        return ','.join(node.hosts for node in self.nodes)

    def start(self) -> 'ZooKeeperEnsemble':
        for node in self.nodes:
            node.start()
        return self

    def wait_ready(self, timeout: float = 30) -> 'ZooKeeperEnsemble':
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

    def modes(self) -> Dict[int, Optional[str]]:
        """{server_id: mode or None} for every node."""
        return {n.server_id: n.mode() for n in self.nodes}

    def leader(self) -> Optional[ZooKeeperNode]:
        """The node currently in mode 'leader' (None if there is none right now)."""
        for node in self.nodes:
            if node.is_running() and node.mode() == 'leader':
                return node
        return None

    def followers(self) -> List[ZooKeeperNode]:
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

    def stop(self, timeout: float = 10) -> None:
        for node in self.nodes:
            node._send(signal.SIGTERM)
            node._send(signal.SIGCONT)
        for node in self.nodes:
            node.stop(timeout)

    def kill(self):
        for node in self.nodes:
            node.kill()

    def close(self) -> None:
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
