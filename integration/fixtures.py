"""Fixtures for the product's integration tests (loaded by conftest.py)."""
import re

import pytest

from integration import zkserver
from integration.private_broker import PrivateRabbitMQ, PrivateRedis
from integration.scenario import Scenario
from integration.workers import start_worker

REDIS_BROKER_DB = 3  # results use db 1, records db 2


def _short_name(name):
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:24]


@pytest.fixture
def scenario_for(request, worker_factory, zk, rabbitmq_url, redis_url):
    """``scenario_for('rabbitmq' | 'redis' | URL)``: a Scenario on that broker."""
    made = []

    def make(broker='rabbitmq'):
        if '://' in broker:
            url = broker
        else:
            url = rabbitmq_url if broker == 'rabbitmq' else \
                redis_url.rsplit('/', 1)[0] + f'/{REDIS_BROKER_DB}'

        def factory(app, **kwargs):
            return worker_factory(app, wait=False, **kwargs)
        s = Scenario(factory, zk.hosts, url, _short_name(request.node.name))
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.fixture
def scenario(scenario_for):
    return scenario_for('rabbitmq')


def module_world(tmp_path_factory, zk_hosts, broker, name, cls=Scenario):
    """Yield a ``cls`` Scenario whose workers live until the generator closes
    (for module-scoped fixtures)."""
    log_dir = tmp_path_factory.mktemp('workers')
    workers = []

    def factory(app, **kwargs):
        w = start_worker(app, log_dir=log_dir, **kwargs)
        workers.append(w)
        return w
    s = cls(factory, zk_hosts, broker, name)
    try:
        yield s
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.stop(timeout=20)
        s.close()


@pytest.fixture(scope='module')
def module_scenario(request, zk, rabbitmq_url, tmp_path_factory):
    """A Scenario whose workers live for the whole test module."""
    yield from module_world(tmp_path_factory, zk.hosts, rabbitmq_url,
                            _short_name(request.module.__name__))


@pytest.fixture
def zk_factory(tmp_path):
    """``zk_factory(start=True)``: a private standalone ZooKeeper for one test."""
    nodes = []

    def make(start=True, **kwargs):
        node = zkserver.ZooKeeperNode(tmp_path / f'zk{len(nodes)}', **kwargs)
        nodes.append(node)
        if start:
            node.start()
            node.wait_ready()
        return node
    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def private_broker(tmp_path, rabbitmq_url, redis_url):
    """``private_broker('rabbitmq' | 'redis')``: a started broker node of this test's
    own, which it may stop and restart (the machine's brokers never are); closed at
    teardown. Ask for it before ``scenario_for``, so its workers stop first. (The
    machine's brokers' fixtures install the servers when they are missing.)"""
    nodes = []

    def make(kind):
        cls = PrivateRabbitMQ if kind == 'rabbitmq' else PrivateRedis
        node = cls(tmp_path / f'{kind}-{len(nodes)}')
        nodes.append(node)
        node.start()
        node.wait_ready()
        return node
    yield make
    for node in nodes:
        node.close()
