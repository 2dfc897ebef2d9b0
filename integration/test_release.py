"""The lease is released exactly once on every way a request can end.

Each test ends a guarded task one way and shows the key acquirable again:
its lease node is gone and the next task on the key runs.
"""
import time

import pytest

from .scenario import wait_for


@pytest.fixture(scope='module')
def world(module_scenario):
    s = module_scenario
    s.worker('w1', concurrency=2)
    return s


def assert_released(s, key, timeout=15):
    path = s.lease_path('ends', key)
    wait_for(lambda: not s.zk.exists(path), timeout=timeout, message=f'release of {key}')
    follow = s.send('ends', key, 'ok')
    follow.get(timeout=20)
    assert follow.state == 'SUCCESS'
    wait_for(lambda: not s.zk.exists(path), timeout=timeout, message=f'release of {key} again')


def runs_of(s, key):
    return [r for r in s.records.executions() if r.key == key]


def test_release_on_success(world):
    world.send('ends', 'r-ok', 'ok').get(timeout=20)
    assert_released(world, 'r-ok')


def test_release_on_failure(world):
    h = world.send('ends', 'r-fail', 'fail')
    with pytest.raises(ValueError):
        h.get(timeout=20)
    assert_released(world, 'r-fail')


def test_release_on_retry(world):
    h = world.send('ends', 'r-retry', 'retry')
    h.get(timeout=30)
    assert h.state == 'SUCCESS'
    runs = runs_of(world, 'r-retry')
    assert len(runs) == 2 and runs[1].start >= runs[0].start
    assert runs[1].token > runs[0].token, 'the retry took a new lease'
    assert_released(world, 'r-retry')


def test_release_on_reject_and_ignore(world):
    h = world.send('ends', 'r-reject', 'reject')
    with pytest.raises(Exception):
        h.get(timeout=20)
    assert_released(world, 'r-reject')
    world.send('ends', 'r-ignore', 'ignore')
    wait_for(lambda: runs_of(world, 'r-ignore'), message='ignore ran')
    assert_released(world, 'r-ignore')


def test_release_on_hard_time_limit_only_after_the_child_died(world):
    h = world.send('ends', 'r-tl', 'sleep', 30, time_limit=1.5)
    wait_for(lambda: runs_of(world, 'r-tl'), message='started')
    pid = runs_of(world, 'r-tl')[0].pid
    path = world.lease_path('ends', 'r-tl')
    # Poll: whenever the node is gone, the child must already be gone.
    deadline = time.monotonic() + 20
    while world.zk.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not world.zk.exists(path)
    assert not _alive(pid), 'the lease was freed while its task could still run'
    with pytest.raises(Exception) as info:
        h.get(timeout=20)
    assert 'TimeLimitExceeded' in repr(info.value)
    assert_released(world, 'r-tl')


def test_release_on_worker_lost(world):
    h = world.send('ends', 'r-lost', 'die')
    with pytest.raises(Exception) as info:
        h.get(timeout=30)
    assert 'WorkerLostError' in repr(info.value)
    assert_released(world, 'r-lost')


def test_release_on_revoke_before_start(world):
    # Two long plain tasks fill both pool processes; the guarded one is granted
    # its lease and waits for a process; revoking it must free the lease.
    blockers = [world.send('plain', i, 3.0) for i in range(2)]
    wait_for(lambda: world.records.count('start') >= 2 and _plain_running(world) == 2,
             message='blockers running')
    h = world.send('ends', 'r-rev', 'ok')
    path = world.lease_path('ends', 'r-rev')
    wait_for(lambda: world.zk.exists(path), message='lease granted while waiting for the pool')
    world.client.control.revoke(h.id)
    for b in blockers:
        b.get(timeout=20)
    wait_for(lambda: h.state == 'REVOKED', message='revoked state')
    assert runs_of(world, 'r-rev') == []
    assert_released(world, 'r-rev')


def _plain_running(s):
    runs = [r for r in s.records.executions() if r.task.endswith('plain') and r.end is None]
    return len(runs)


def _alive(pid):
    from .procs import running
    return running(pid)
