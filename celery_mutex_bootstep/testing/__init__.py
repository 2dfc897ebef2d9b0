"""Test helpers for users of celery-mutex-bootstep (as ``kazoo.testing`` and
``celery.contrib.testing`` are for theirs): a private ZooKeeper server for your tests.

    from celery_mutex_bootstep.testing import zookeeper_server

    with zookeeper_server() as zk:          # a standalone JVM on a free port, data in a temp dir
        app.conf.mutex_hosts = zk.hosts     # '127.0.0.1:PORT'
        ...

With pytest the ``mutex_zookeeper`` fixture (registered through the ``pytest11`` entry
point, see :mod:`celery_mutex_bootstep.testing.pytest_plugin`) gives one such server per
test session. :class:`ZooKeeperEnsemble` runs several servers as one quorum.

Needs Java and Debian's ``zookeeper`` package (``apt-get install zookeeper``), or the
``JAVA`` / ``ZOOKEEPER_CLASSPATH`` environment variables pointing at another install.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .ensemble import ZooKeeperEnsemble
from .zookeeper import (ZooKeeperError, ZooKeeperNode, ZooKeeperServer, find_free_port,
                        find_free_ports, standalone)

__all__ = ['ZooKeeperEnsemble', 'ZooKeeperError', 'ZooKeeperNode', 'ZooKeeperServer',
           'find_free_port', 'find_free_ports', 'standalone', 'zookeeper_server',
           'zookeeper_ensemble']


@contextlib.contextmanager
def zookeeper_server(**kwargs) -> Iterator[ZooKeeperServer]:
    """A started, serving standalone server, stopped and its directory removed on exit.

    Keyword arguments go to :func:`standalone` (``port``, ``tick_time``, ``base_dir``...).
    The default tickTime is 500 ms, so sessions may be as short as 1 s (2 x tickTime).
    """
    server = standalone(**kwargs)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def zookeeper_ensemble(n: int = 3, *, timeout: float = 60,
                       **kwargs) -> Iterator[ZooKeeperEnsemble]:
    """*n* servers forming one quorum, serving with a leader; all stopped on exit."""
    ensemble = ZooKeeperEnsemble(n, **kwargs)
    try:
        ensemble.start()
        ensemble.wait_ready(timeout)
        yield ensemble
    finally:
        ensemble.close()
