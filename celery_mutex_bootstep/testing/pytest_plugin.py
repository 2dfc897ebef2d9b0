"""pytest fixtures of celery-mutex-bootstep, loaded through the ``pytest11`` entry point.

``mutex_zookeeper``: a private standalone ZooKeeper server for the whole test session
(a :class:`~celery_mutex_bootstep.testing.ZooKeeperServer`; ``.hosts`` is the connection
string for ``mutex_hosts``). It is only started when a test asks for it. A test that
stops or pauses it gets it back serving for the next test.

Without the entry point (``-p no:celery_mutex_bootstep``), list this module in
``pytest_plugins = ['celery_mutex_bootstep.testing.pytest_plugin']`` in a conftest.py.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from .zookeeper import ZooKeeperServer, standalone


@pytest.fixture(scope='session')
def _mutex_zookeeper_session() -> Iterator[ZooKeeperServer]:
    server = standalone()
    yield server
    server.close()


@pytest.fixture
def mutex_zookeeper(_mutex_zookeeper_session: ZooKeeperServer) -> Iterator[ZooKeeperServer]:
    """The session's private ZooKeeper server, serving when the test starts."""
    server = _mutex_zookeeper_session
    yield server
    # undo a fault the test injected, so that it does not leak into the next test
    server.resume()
    if not server.is_running():
        server.start()
    server.wait_ready(30)
