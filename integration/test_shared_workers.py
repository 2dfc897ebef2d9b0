"""Shared (read) locks on real prefork workers, ZooKeeper and RabbitMQ: readers of one
key overlap each other, no exclusive holder overlaps anything, nothing is lost; and a
worker SIGKILLed while its readers hold frees the key for the exclusive call."""
import time

import pytest

from celery_mutex_bootstep.keys import key_digest

from .records import overlaps
from .scenario import wait_for
from .faults import SESSION_TIMEOUT, observer, session_args, wait_completed
from .test_policies import policy_scenario  # noqa: F401 (a fixture)


def split(pairs):
    """Overlapping pairs: (reader with reader, any with an exclusive holder)."""
    readers = [(a, b) for _, a, b in pairs if a.extra['shared'] and b.extra['shared']]
    exclusive = [(a, b) for _, a, b in pairs if not (a.extra['shared'] and b.extra['shared'])]
    return readers, exclusive


@pytest.mark.parametrize('broker', ['rabbitmq', 'redis'])
def test_readers_run_together_and_writers_alone_across_two_workers(policy_scenario, broker):
    s = policy_scenario(broker)
    workers = [s.worker('a', concurrency=3), s.worker('b', concurrency=3)]
    handles = []
    for i in range(24):  # a writer after every 3 readers, all on one account
        task = 'write_book' if i % 4 == 3 else 'read_book'
        handles.append(s.send(task, 7, 0.3, i))
    runs = wait_completed(s, handles, timeout=90, workers=workers)
    assert [h.get(timeout=10) for h in handles] == list(range(24))
    assert sorted(r.extra['seq'] for r in runs) == list(range(24)), 'lost or run twice'
    readers, exclusive = split(overlaps(runs))
    assert exclusive == [], 'an exclusive holder overlapped: ' + repr(exclusive[:3])
    assert readers, 'readers of one key never ran together'


def test_a_killed_workers_readers_free_the_key_for_the_waiting_writer(policy_scenario):
    s = policy_scenario()
    args = ['--mutex-session-timeout', '4']
    a = s.worker('a', concurrency=2, extra_args=args)
    held = [s.send('read_book', 9, 60.0, i) for i in range(2)]  # acked at start
    wait_for(lambda: s.records.count('start') == 2, message='both readers of a run')
    s.client.control.cancel_consumer(s.queue, destination=[s.nodename(a)], reply=True)
    b = s.worker('b', concurrency=2, extra_args=args)
    writer = s.send('write_book', 9, 0.2, 10)
    digest = key_digest('book', (9,))
    zk = observer(s.zk_hosts)
    try:  # the writer waits on b and marks the key: later readers queue behind it
        wait_for(lambda: zk.exists(f'{s.namespace}/.writer-waiting-{digest}'),
                 message='the waiting writer marked the key')
    finally:
        zk.stop()
        zk.close()
    late_reader = s.send('read_book', 9, 0.2, 11)
    time.sleep(1.0)
    assert s.records.count('start') == 2, 'something ran beside the readers'
    killed_at = time.time()
    a.kill()
    a.kill_group()
    assert writer.get(timeout=40) == 10
    assert late_reader.get(timeout=40) == 11
    runs = s.records.executions()
    _, exclusive = split(overlaps(runs, open_end=killed_at))
    assert exclusive == [], 'the writer overlapped a reader: ' + repr(exclusive)
    assert all(h.state != 'SUCCESS' for h in held)
    w = [r for r in runs if r.extra['seq'] == 10]
    assert len(w) == 1 and w[0].worker == s.nodename(b)
    late = [r for r in runs if r.extra['seq'] == 11]
    assert len(late) == 1 and late[0].start >= w[0].end, 'the later reader overtook the writer'


def test_readers_killed_with_the_session_run_again_and_never_beside_the_writer(
        zk_factory, policy_scenario):
    s = policy_scenario()
    node = zk_factory()
    s.zk_hosts = node.hosts
    s.worker('a', concurrency=3, hosts=node.hosts, extra_args=session_args())
    readers = [s.send('read_book', 5, 8.0, i) for i in range(2)]  # outlive the session
    wait_for(lambda: s.records.count('start') == 2, message='both readers run')
    writer = s.send('write_book', 5, 0.3, 10)   # waits for them in the consumer
    time.sleep(0.3)
    t_stop = time.time()
    node.stop()
    time.sleep(2 * SESSION_TIMEOUT)  # the session is given up: the readers are killed
    node.start()
    node.wait_ready()
    assert [h.get(timeout=60) for h in readers + [writer]] == [0, 1, 10]
    runs = s.records.executions()
    # a killed reader counts as running until ZooKeeper was back, at the latest
    _, exclusive = split(overlaps(runs, open_end=t_stop + 2 * SESSION_TIMEOUT))
    assert exclusive == [], 'the writer overlapped a reader: ' + repr(exclusive)
    killed = [r for r in runs if r.end is None]
    assert sorted(r.extra['seq'] for r in killed) == [0, 1], 'the readers were not stopped'
    for seq in (0, 1, 10):
        assert len([r for r in runs if r.extra['seq'] == seq and r.end is not None]) == 1
