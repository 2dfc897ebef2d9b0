"""Users of celery_mutex and zkcelery change one import: their tasks, on real workers.

One worker for the module (integration/migrationapp.py), started WITHOUT
``--mutex-hosts``: the app config's ``ZOOKEEPER_HOSTS`` names the test
ZooKeeper and ``MUTEX_TIMEOUT`` the default timeout, as those libraries read
them. MutexTask tasks keep the old option names (``mutex_keys``,
``mutex_timeout``, ``mutex_requeue``) and the old default of dropping a
contended call, visibly. LockTask tasks take kazoo locks and semaphores in the
pool processes; no contender node is left behind.
"""
import logging
import re
import time
import uuid
from typing import Any, List

import pytest
from celery import Celery
from kazoo.exceptions import NoNodeError
from kazoo.recipe.lock import Lock

from celery_mutex_bootstep.keys import key_digest
from celery_mutex_bootstep.migration import LockTask, close_lock_sessions, lock_session

from .fixtures import module_world
from .scenario import Scenario, wait_for

APP = 'integration.migrationapp'
MUTEX_TIMEOUT = 45  # app config MUTEX_TIMEOUT of the module's worker
LEASE_NAME = re.compile(r'[0-9a-f]{64}(-\d+)?')


class MigrationScenario(Scenario):
    """A Scenario whose workers run integration.migrationapp."""

    app_module = APP

    def lock_path(self, task: str, *refinements: Any, kind: str = 'lock') -> str:
        digest = key_digest(f'{self.app_module}.{task}', list(refinements))
        return f'{self.namespace}/locks/{kind}-{digest}'

    def leftover_nodes(self) -> List[str]:
        """Lease nodes under the namespace and every ephemeral node under its
        locks/ (lock and semaphore contenders); the step's own per-session
        nodes (e.g. its clock node) are not leftovers."""
        found = [f'{self.namespace}/{n}' for n in self.children(self.namespace)
                 if LEASE_NAME.fullmatch(n)]

        def walk(path):
            for child in self.children(path):
                sub = f'{path}/{child}'
                stat = self.zk.exists(sub)
                if stat is not None and stat.ephemeralOwner:
                    found.append(sub)
                walk(sub)
        walk(f'{self.namespace}/locks')
        return found

    def children(self, path) -> List[str]:
        try:
            return self.zk.get_children(path)
        except NoNodeError:
            return []


@pytest.fixture(scope='module')
def mig(zk, rabbitmq_url, redis_url, tmp_path_factory):
    world = module_world(tmp_path_factory, zk.hosts, rabbitmq_url, 'migration',
                         cls=MigrationScenario)
    s = next(world)
    try:
        # No --mutex-hosts: ZOOKEEPER_HOSTS in the app config must be used.
        s.worker('w1', concurrency=6, hosts=False, env={
            'TEST_ZOOKEEPER_HOSTS': zk.hosts, 'TEST_MUTEX_TIMEOUT': str(MUTEX_TIMEOUT)})
        yield s
    finally:
        world.close()


def started(s, handle, **match):
    """The start record of ``handle`` (optionally with field values), or None."""
    for r in s.records.raw():
        if r['id'] == handle.id and r['phase'] == 'start' and all(
                r.get(k) == v for k, v in match.items()):
            return r
    return None


def runs_of(s, key):
    return sorted((r for r in s.records.executions() if r.key == key), key=lambda r: r.start)


def peak(runs):
    events = sorted([(r.start, 1) for r in runs] + [(r.end, -1) for r in runs])
    level = top = 0
    for _, step in events:
        level += step
        top = max(top, level)
    return top


def contenders(s, path):
    return Lock(s.zk, path).contenders() if s.zk.exists(path) else []


def log_of(s):
    return '\n'.join(s.workers[0].log_text().splitlines()[-40:])


# --------------------------------------------------------------------------- MutexTask

def test_mutex_task_drops_a_contended_call_visibly(mig):
    s = mig
    assert '--mutex-hosts' not in s.workers[0].cmd
    holder = s.send('refined', 1, 2, 1.5)
    wait_for(lambda: started(s, holder), message='holder running')
    # The lease is in the test ZooKeeper: ZOOKEEPER_HOSTS was honoured.
    assert s.zk.exists(s.lease_path('refined', 1)), log_of(s)
    contended = s.send('refined', 1, 5, 0)
    other = s.send('refined', 2, 3, 0)  # another value of mutex_keys: runs meanwhile
    with pytest.raises(Exception) as info:
        contended.get(timeout=20)
    assert type(info.value).__name__ == 'MutexContended'
    assert contended.state == 'FAILURE'
    assert other.get(timeout=20) == [5, 30.0], 'mutex_timeout=30 on the task'
    assert holder.get(timeout=20) == [3, 30.0]
    assert started(s, contended) is None, 'the dropped call never ran'
    assert runs_of(s, 'refined/2')[0].start < runs_of(s, 'refined/1')[0].end
    line = [x for x in s.workers[0].log_text().splitlines()
            if 'skipped' in x and contended.id in x]
    assert line and 'WARNING' in line[0], log_of(s)


def test_mutex_task_without_keys_is_one_mutex_with_config_timeout(mig):
    s = mig
    holder = s.send('whole', 1.0)
    wait_for(lambda: started(s, holder), message='holder running')
    with pytest.raises(Exception) as info:
        s.send('whole', 0).get(timeout=20)
    assert type(info.value).__name__ == 'MutexContended'
    assert holder.get(timeout=20) == MUTEX_TIMEOUT, 'MUTEX_TIMEOUT from the app config'


def test_mutex_requeue_true_waits_and_runs(mig):
    s = mig
    holder = s.send('requeued', 'srv1', 'h', 1.0)
    wait_for(lambda: started(s, holder), message='holder running')
    waiter = s.send('requeued', 'srv1', 'w', 0)
    assert waiter.get(timeout=20) == 'w'
    assert holder.get(timeout=20) == 'h'
    runs = runs_of(s, 'requeued/srv1')
    assert [r.extra['data'] for r in runs] == ['h', 'w']
    assert runs[1].start >= runs[0].end, 'the waiter ran after the holder, not beside it'


# --------------------------------------------------------------------------- LockTask

def test_lock_task_uses_one_session_per_pool_process_from_zookeeper_hosts(mig, zk):
    s = mig
    handles = [s.send('lock_session_of_process', f'sess-{i}', 0.3) for i in range(12)]
    replies = [h.get(timeout=20) for h in handles]
    assert all(r['acquired'] for r in replies)
    assert {r['hosts'] for r in replies} == {zk.hosts}, 'ZOOKEEPER_HOSTS in the pool too'
    sessions = {}
    for r in replies:
        sessions.setdefault(r['pid'], set()).add(r['session'])
    assert len(sessions) >= 2, f'precondition: several pool processes ran them: {sessions}'
    assert all(len(v) == 1 for v in sessions.values()), f'one session per process: {sessions}'
    all_sessions = [next(iter(v)) for v in sessions.values()]
    assert len(set(all_sessions)) == len(all_sessions), 'no session shared across processes'
    assert s.workers[0].pid not in sessions


def test_lock_same_refinement_excludes_non_blocking(mig):
    s = mig
    ref = 'acct/7 ü'  # slashes and unicode are fine: the name is hashed
    holder = s.send('locked', ref, 1.5, 0)
    wait_for(lambda: started(s, holder, acquired=True), message='holder has the lock')
    path = s.lock_path('locked', ref)
    assert len(contenders(s, path)) == 1
    loser = s.send('locked', ref, 0, 1)
    other = s.send('locked', 'acct/8', 0, 2)
    assert loser.get(timeout=20) is False, 'same refinement: not acquired'
    assert other.get(timeout=20) is True, 'another refinement: acquired'
    assert len(contenders(s, path)) == 1, 'the failed acquire left no contender node'
    assert holder.get(timeout=20) is True
    wait_for(lambda: contenders(s, path) == [], timeout=5, message='lock released')


def test_lock_retry_true_retries_until_it_gets_the_lock(mig):
    s = mig
    holder = s.send('locked_retry', 'rt', 1.0)
    wait_for(lambda: started(s, holder), message='holder has the lock')
    waiter = s.send('locked_retry', 'rt', 0)
    assert waiter.get(timeout=30) >= 1, 'it retried'
    assert holder.get(timeout=20) == 0
    runs = runs_of(s, 'lock/rt')
    assert [r.id for r in runs] == [holder.id, waiter.id]
    assert runs[1].start >= runs[0].end
    assert contenders(s, s.lock_path('locked_retry', 'rt')) == []


def test_lock_blocking_waits(mig):
    s = mig
    first = s.send('locked_blocking', 'bl', 1.0)
    wait_for(lambda: started(s, first), message='first has the lock')
    second = s.send('locked_blocking', 'bl', 0)
    assert second.get(timeout=20) is True and first.get(timeout=20) is True
    runs = runs_of(s, 'lock/bl')
    assert [r.id for r in runs] == [first.id, second.id]
    assert runs[1].start >= runs[0].end
    assert contenders(s, s.lock_path('locked_blocking', 'bl')) == []


def test_semaphore_of_two(mig):
    s = mig
    # Blocking: five callers, never more than two at once, all get through.
    handles = [s.send('semaphored', 'sem', 0.5, True, i) for i in range(5)]
    assert [h.get(timeout=30) for h in handles] == [True] * 5
    assert peak(runs_of(s, 'sem/sem')) == 2
    # Non-blocking: two callers at once both get a lease (kazoo's guard lock
    # alone would turn one away), a third while they hold does not.
    pair = [s.send('semaphored', 'nb', 1.5, False, i) for i in range(2)]
    wait_for(lambda: all(started(s, h, acquired=True) for h in pair), timeout=10,
             message='both holders have a lease')
    third = s.send('semaphored', 'nb', 0, False, 2)
    assert third.get(timeout=20) is False
    assert [h.get(timeout=20) for h in pair] == [True, True]
    path = s.lock_path('semaphored', 'nb', kind='semaphore')
    wait_for(lambda: s.zk.get_children(path) == [], timeout=5, message='leases released')


def test_lock_while_zookeeper_is_down_is_not_acquired_then_recovers(zk_factory, caplog):
    """In this process (no worker): with ZooKeeper stopped a non-blocking lock
    yields False within about two session timeouts, with a WARNING, and a lock
    whose release could not reach ZooKeeper is released once it is back."""
    node = zk_factory()
    app = Celery('inproc', broker='memory://', set_as_current=False)
    app.conf.update(mutex_hosts=node.hosts, mutex_session_timeout=4,
                    mutex_namespace=f'/mt-inproc-{uuid.uuid4().hex[:8]}')

    @app.task(base=LockTask, bind=True)
    def job(self):
        pass
    try:
        with job.lock('x') as acquired:
            assert acquired is True
        session = lock_session(app)
        with job.lock('y') as held:
            assert held is True
            node.stop()
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger='celery_mutex_bootstep.migration'):
                with job.lock('x') as acquired:
                    assert acquired is False
            took = time.monotonic() - t0
        # It returned, not acquired, while ZooKeeper was still down (a hang would hang
        # the test); how long it took is the machine's business (it gives up after one
        # session timeout, 4 s).
        print(f'the lock gave up after {took:.2f}s with ZooKeeper down')
        assert any('did not answer' in r.getMessage() for r in caplog.records)
        assert len(session.orphans) == 1, 'the release of y is owed'
        node.start()
        node.wait_ready()
        wait_for(lambda: len(session.orphans) == 0, timeout=15, message='owed release done')
        y = job.lock_path('y')
        assert Lock(session.client, y).contenders() == []
        with job.lock('y') as acquired:
            assert acquired is True
            holders = Lock(session.client, y).contenders()
            assert len(holders) == 1 and '"pid"' in holders[0], holders
        assert Lock(session.client, y).contenders() == []
    finally:
        close_lock_sessions()


def test_no_lock_or_lease_node_is_left_behind(mig):
    s = mig
    wait_for(lambda: s.leftover_nodes() == [], timeout=10,
             message=f'no lease or contender node left: {s.leftover_nodes()}')
    locks = s.zk.get_children(f'{s.namespace}/locks')
    assert any(n.startswith('lock-') for n in locks) and any(
        n.startswith('semaphore-') for n in locks), locks
