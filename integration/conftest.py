"""pytest fixtures for the integration tests: private ZooKeeper servers, the local
brokers and real Celery worker processes.

Session fixtures: ``zk`` (standalone ZooKeeperNode), ``zk_ensemble`` (3 nodes, started
only if a test asks for it), ``rabbitmq_url``, ``redis_url``.
Function fixture: ``worker_factory(app_module, *, hostname=None, wait=True, **kwargs)``
starts ``celery worker`` processes (see integration.workers.start_worker) logging to the
test's tmp_path, and stops them all at teardown.

After each test that used ``zk`` or ``zk_ensemble`` a paused node is resumed and a
stopped or killed node is restarted, so that fault-injecting tests do not leak their
faults into the next test.

Tests marked ``chaos_full`` only run with ``--run-chaos-full`` (``make chaos``). Modules
marked ``faults`` (fault injection: ZooKeeper outages, lost sessions, killed and cut-off
workers, the short chaos run) run in ``make faults``, apart from ``make test``, to keep
each under about 15 minutes; CI runs both.
"""

import itertools
import os
import sys
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

from integration import brokers, zkserver  # noqa: E402
from integration.workers import start_worker  # noqa: E402


# --------------------------------------------------------------------------- options

def pytest_addoption(parser):
    try:
        parser.addoption('--run-chaos-full', action='store_true', default=False,
                         help='also run the long chaos scenarios (tests marked chaos_full)')
    except ValueError:  # already added by another conftest
        pass


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'chaos_full: long chaos scenario, only run with --run-chaos-full')
    config.addinivalue_line(
        'markers', 'faults: fault-injection tests (make faults; make test leaves them out)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--run-chaos-full', default=False):
        return
    skip = pytest.mark.skip(reason='long chaos scenario: run with --run-chaos-full (make chaos)')
    for item in items:
        if 'chaos_full' in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of every worker log (and of the ZooKeeper logs)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != 'call' or not report.failed:
        return
    for worker in getattr(item, '_integration_workers', ()):
        report.sections.append(('celery worker %s (pid %s, rc %s): log tail' % (
            worker.hostname, worker.pid, worker.returncode), worker.log_tail(60)))
    funcargs = getattr(item, 'funcargs', {})
    node = funcargs.get('zk')
    if isinstance(node, zkserver.ZooKeeperNode):
        report.sections.append(('zookeeper %s: log tail' % node.hosts, node.log_tail(20)))
    ensemble = funcargs.get('zk_ensemble')
    if isinstance(ensemble, zkserver.ZooKeeperEnsemble):
        for n in ensemble.nodes:
            report.sections.append(('zookeeper node %d %s: log tail' % (n.server_id, n.hosts),
                                    n.log_tail(15)))


# --------------------------------------------------------------------------- ZooKeeper

@pytest.fixture(scope='session')
def zk():
    """A private standalone ZooKeeper (tickTime 500 ms) for the whole session."""
    node = zkserver.standalone()
    yield node
    node.close()


@pytest.fixture(scope='session')
def zk_ensemble():
    """A private 3-node ZooKeeper ensemble for the whole session (started on first use)."""
    ensemble = zkserver.ZooKeeperEnsemble(3)
    try:
        ensemble.start()
        ensemble.wait_ready(60)
    except BaseException:
        ensemble.close()
        raise
    yield ensemble
    ensemble.close()


def _heal_node(node):
    node.resume()
    if not node.is_running():
        node.start()


@pytest.fixture(autouse=True)
def _heal_zookeeper(request):
    """Undo pause/stop/kill of the shared ZooKeeper servers after each test."""
    yield
    if 'zk' in request.fixturenames:
        node = request.getfixturevalue('zk')
        if isinstance(node, zkserver.ZooKeeperNode):  # not some overriding fixture
            _heal_node(node)
            node.wait_ready(30)
    if 'zk_ensemble' in request.fixturenames:
        ensemble = request.getfixturevalue('zk_ensemble')
        if isinstance(ensemble, zkserver.ZooKeeperEnsemble):
            for node in ensemble.nodes:
                _heal_node(node)
            ensemble.wait_ready(60)


# --------------------------------------------------------------------------- brokers

@pytest.fixture(scope='session')
def rabbitmq_url():
    """'amqp://guest:guest@127.0.0.1:5672//' (started if it was not running)."""
    return brokers.ensure_rabbitmq()


@pytest.fixture(scope='session')
def redis_url():
    """'redis://127.0.0.1:6379/0' (started if it was not running)."""
    return brokers.ensure_redis()


# --------------------------------------------------------------------------- workers

@pytest.fixture
def worker_factory(request, tmp_path):
    """Start real ``celery worker`` processes; all are stopped at teardown.

    ``worker_factory(app_module, *, hostname=None, wait=True, ready_timeout=60, **kwargs)``
    passes *kwargs* (concurrency, pool, extra_args, env, loglevel) to start_worker, logs to
    ``tmp_path/workers/``, and by default waits for the worker's 'ready.' line.
    """
    workers = []
    request.node._integration_workers = workers
    counter = itertools.count(1)
    run_id = uuid.uuid4().hex[:6]

    def factory(app_module, *, hostname=None, wait=True, ready_timeout=60, **kwargs):
        if hostname is None:
            hostname = 'w%d-%s@%%h' % (next(counter), run_id)
        worker = start_worker(app_module, hostname=hostname,
                              log_dir=tmp_path / 'workers', **kwargs)
        workers.append(worker)
        if wait:
            worker.wait_ready(ready_timeout)
        return worker

    yield factory

    for worker in workers:  # warm shutdown of all of them in parallel
        worker.terminate()
    for worker in workers:
        worker.stop(timeout=20)


from integration.fixtures import *  # noqa: E402,F401,F403  (the product tests)
