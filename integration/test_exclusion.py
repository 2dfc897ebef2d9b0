"""Exclusion when a worker loses its whole network, or its consumer thread stops.

A worker host whose network fails loses ZooKeeper and the broker at the same moment;
its consumer thread then sits in kombu's reconnect loop and runs nothing handed to it.
Its holders must still be dead before the ZooKeeper server can expire its session,
which is the earliest moment another worker can acquire their keys.

Each test counts a killed execution until its pool process was seen gone, asserts that
no two executions of one key overlapped and that every task completed.
"""
import time

import pytest

from .scenario import wait_for
from .tcpproxy import TcpProxy
from .test_faults import (SESSION_GIVEN_UP, _started, assert_no_overlap,  # noqa: F401
                          assert_no_overlap_until_stopped, describe, watch_factory,
                          log_lines, mutex_log, session_args, wait_completed)

BROKER = ('127.0.0.1', 5672)


@pytest.fixture
def proxies():
    made = []

    def make(target):
        proxy = TcpProxy(target)
        made.append(proxy)
        return proxy
    yield make
    for proxy in made:
        proxy.close()


def _worker_behind_proxies(s, zk_factory, proxies):
    """Worker 'a', reaching ZooKeeper (4 s sessions at most) and the broker through
    proxies the test controls; other workers reach both directly."""
    node = zk_factory(max_session_timeout=4000)
    s.zk_hosts = node.hosts
    zk_proxy = proxies(('127.0.0.1', node.client_port))
    mq_proxy = proxies(BROKER)
    a = s.worker('a', concurrency=2, hosts=zk_proxy.hosts, extra_args=session_args(),
                 env={'TEST_BROKER': f'amqp://guest:guest@{mq_proxy.hosts}//'})
    return a, zk_proxy, mq_proxy


def _takeover(s, runs, watch, holder, key, t0):
    """The cut-off holder's death and the other worker's first start on its key."""
    first = sorted((r for r in runs if r.id == holder.id), key=lambda r: r.start)[0]
    assert first.end is None, f'the cut-off holder ran to its end: {describe(first, watch, t0)}'
    died = watch.died_at(first.pid, first.start)
    assert died is not None, f'the cut-off holder never died: {describe(first, watch, t0)}'
    others = [r for r in runs if r.key == key and r.worker != first.worker
              and r.start > first.start]
    assert others, f'no other worker took {key} over'
    return first, died, min(r.start for r in others)


@pytest.mark.parametrize('task', ['work_late', 'work'])
def test_worker_losing_broker_and_zookeeper_at_once_stops_its_holder_in_time(
        task, zk_factory, proxies, watch_factory, scenario):
    """The double fault: ZooKeeper stalls and the broker refuses, at the same moment."""
    s = scenario
    a, zk_proxy, mq_proxy = _worker_behind_proxies(s, zk_factory, proxies)
    watch = watch_factory(s)
    holder = s.send(task, 'p', 12.0, 0)
    wait_for(lambda: _started(s, {holder.id}), message='the holder started on a')
    b = s.worker('b', concurrency=2, extra_args=session_args())
    queued = [s.send(task, 'p', 0.2, i) for i in range(1, 4)]
    time.sleep(1.0)
    assert [r.id for r in s.records.executions()] == [holder.id], 'p is held by a'

    t_cut = time.time()
    zk_proxy.stall()
    mq_proxy.refuse()
    time.sleep(10)
    zk_proxy.resume()
    mq_proxy.accept()
    t_back = time.time()

    handles = [holder] + queued
    runs = wait_completed(s, handles, timeout=90, workers=[a, b])
    test_end = time.time()
    assert_no_overlap(runs, watch, test_end, t0=t_cut)
    assert log_lines(a, SESSION_GIVEN_UP), mutex_log([a])
    first, died, taken = _takeover(s, runs, watch, holder, 'p', t_cut)
    assert t_cut < died < t_back, describe(first, watch, t_cut)
    assert taken >= died
    print(f'{task}: cut at 0; a\'s holder died {died - t_cut:.3f}s, b first started p '
          f'{taken - t_cut:.3f}s; network back {t_back - t_cut:.3f}s')
    assert_no_overlap_until_stopped(s, watch)


def test_holders_die_in_time_while_the_consumer_thread_is_blocked(
        zk_factory, proxies, watch_factory, scenario):
    """The consumer thread blocked (a remote-control call the test app provides) for
    longer than the session while ZooKeeper is cut off: nothing waits on it."""
    s = scenario
    node = zk_factory(max_session_timeout=4000)
    s.zk_hosts = node.hosts
    zk_proxy = proxies(('127.0.0.1', node.client_port))
    a = s.worker('a', concurrency=2, hosts=zk_proxy.hosts, extra_args=session_args())
    watch = watch_factory(s)
    holder = s.send('work_late', 'q', 12.0, 0)
    wait_for(lambda: _started(s, {holder.id}), message='the holder started on a')
    b = s.worker('b', concurrency=2, extra_args=session_args())
    queued = [s.send('work_late', 'q', 0.2, i) for i in range(1, 3)]
    time.sleep(1.0)

    s.client.control.broadcast('test_block_consumer', arguments={'seconds': 9},
                               destination=[s.nodename(a)])
    time.sleep(0.5)  # the call is on a's consumer thread now
    t_cut = time.time()
    zk_proxy.stall()
    time.sleep(8)
    zk_proxy.resume()
    t_back = time.time()

    runs = wait_completed(s, [holder] + queued, timeout=90, workers=[a, b])
    test_end = time.time()
    assert_no_overlap(runs, watch, test_end, t0=t_cut)
    first, died, taken = _takeover(s, runs, watch, holder, 'q', t_cut)
    assert t_cut < died < t_back, describe(first, watch, t_cut)
    assert taken >= died
    blocked = [x for x in a.log_text().splitlines() if 'test: consumer unblocked' in x]
    assert blocked, 'the consumer thread was not blocked: ' + mutex_log([a])
    print(f'consumer blocked; a\'s holder died {died - t_cut:.3f}s after the cut, '
          f'b first started q {taken - t_cut:.3f}s')
    assert_no_overlap_until_stopped(s, watch)


def test_republish_that_fails_while_the_broker_is_away_is_kept_and_retried(
        zk_factory, proxies, watch_factory, scenario):
    """An early-acked holder is killed on session loss; its copy cannot be published
    (the broker refuses new connections) and is kept until it can."""
    s = scenario
    a, zk_proxy, mq_proxy = _worker_behind_proxies(s, zk_factory, proxies)
    watch = watch_factory(s)
    holder = s.send('work', 'r', 8.0, 0)
    wait_for(lambda: _started(s, {holder.id}), message='the holder started on a')

    t_cut = time.time()
    mq_proxy.refuse(sever=False)  # the consumer keeps its connection; no new ones
    zk_proxy.stall()
    wait_for(lambda: log_lines(a, 'could not republish', level='WARNING'), timeout=30,
             message='a republish failed')
    time.sleep(2.0)  # it keeps failing meanwhile: the task must not be lost
    assert not [r for r in s.records.executions() if r.end is not None]
    mq_proxy.accept()
    zk_proxy.resume()

    runs = wait_completed(s, [holder], timeout=60, workers=[a])
    assert_no_overlap(runs, watch, time.time(), t0=t_cut)
    assert len([r for r in runs if r.id == holder.id]) == 2, 'killed once, ran again once'
    assert log_lines(a, 'after the broker came back', level='INFO'), mutex_log([a])
    assert_no_overlap_until_stopped(s, watch)


@pytest.mark.parametrize('pool', ['prefork', 'threads'])
def test_a_request_waiting_long_for_a_free_process_still_runs(pool, watch_factory, scenario):
    """Granted, then queued in the pool (the threads pool's executor queue) for longer
    than the session's deadline while the only process is busy: under a healthy session
    it runs, once, without being refused and handed back."""
    s = scenario
    extra = session_args() + (['--mutex-on-session-loss', 'continue']
                              if pool == 'threads' else [])
    s.worker('a', concurrency=1, pool=pool, extra_args=extra)
    busy = s.send('work', 'busy', 7.0, 0)
    wait_for(lambda: _started(s, {busy.id}), message='the process is busy')
    parked = s.send('work', 'parked', 0.1, 1)
    runs = wait_completed(s, [busy, parked], timeout=60, workers=s.workers)
    assert len([r for r in runs if r.id == parked.id]) == 1
    a = s.workers[0]
    assert not log_lines(a, 'refused by its pool process', level='WARNING'), mutex_log([a])
    assert not log_lines(a, 'started after its lease may have expired'), mutex_log([a])


def test_operator_release_of_a_holder_not_started_yet_waits_until_it_is_dead(
        watch_factory, scenario):
    """`celery mutex release` on a request handed to the pool but not started (the only
    process is busy): the lease stays until the task started and was killed, so no
    other holder of the key can overlap it."""
    s = scenario
    a = s.worker('a', concurrency=1)
    watch = watch_factory(s)
    busy = s.send('work', 'busy', 3.0, 0)
    wait_for(lambda: _started(s, {busy.id}), message='the process is busy')
    parked = s.send('work', 'x', 5.0, 1)
    path = s.lease_path('work', 'x')
    wait_for(lambda: s.zk.exists(path), message='the parked request holds x')
    replies = s.client.control.broadcast('mutex_release', arguments={'task_id': parked.id},
                                         destination=[s.nodename(a)], reply=True, timeout=5)
    assert replies, 'the worker answered'
    b = s.worker('b', concurrency=1)
    other = s.send('work', 'x', 0.1, 2)
    assert s.zk.exists(path), 'released before the parked request could no longer run'
    runs = wait_completed(s, [busy, other], timeout=60, workers=[a, b])
    assert_no_overlap(runs, watch, time.time())
    parked_runs = [r for r in runs if r.id == parked.id]
    assert all(r.end is None for r in parked_runs), 'the released holder was stopped'
    assert_no_overlap_until_stopped(s, watch)


def test_quorum_delivery_count_rule_applies_when_a_lost_holder_is_handed_back(
        zk_factory, proxies, watch_factory, scenario_for):
    """An unacknowledged (acks_late) holder stopped on session loss goes back by
    republish, not requeue, once its quorum queue counted mutex_republish_after
    deliveries: another requeue could let the delivery limit drop it."""
    s = scenario_for('rabbitmq')
    s.queue = s.queue + '-qq'
    s.client.conf.task_default_queue = s.queue
    s.records.name = s.queue
    from kombu import Queue
    s.client.conf.task_queues = [Queue(s.queue, queue_arguments={
        'x-queue-type': 'quorum', 'x-delivery-limit': 3})]
    node = zk_factory(max_session_timeout=4000)
    s.zk_hosts = node.hosts
    zk_proxy = proxies(('127.0.0.1', node.client_port))
    env = {'TEST_QUEUE_TYPE': 'quorum', 'TEST_DELIVERY_LIMIT': '3',
           'TEST_REPUBLISH_AFTER': '1'}
    a = s.worker('a', concurrency=2, hosts=zk_proxy.hosts, extra_args=session_args(), env=env)
    watch = watch_factory(s)
    # Delivered before (as a message that waited for its key would have been).
    holder = s.send('work_late', 'qq', 8.0, 0, headers={'x-delivery-count': 2})
    wait_for(lambda: _started(s, {holder.id}), message='the holder started on a')
    seen = s.records.executions()[0]
    t_cut = time.time()
    zk_proxy.stall()
    wait_for(lambda: watch.died_at(seen.pid, seen.start), timeout=30,
             message='the holder was killed')
    zk_proxy.resume()
    runs = wait_completed(s, [holder], timeout=60, workers=[a])
    assert_no_overlap(runs, watch, time.time(), t0=t_cut)
    from .test_contention import mutex_info
    counters = mutex_info(s, a)['counters']
    assert counters['republished'] >= 1, counters
    assert_no_overlap_until_stopped(s, watch)
