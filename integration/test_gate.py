"""The core gate end to end: real ZooKeeper, real broker, real prefork workers.

Every execution is recorded by the task itself (integration/testapp.py); the
assertions are about what ran: no overlap per key, no contended run, no loss.
"""
import random
import subprocess
import sys

import pytest

from .records import by_key, overlaps
from .scenario import wait_for
from .workers import worker_env


def results(handles, timeout=120):
    return [h.get(timeout=timeout, propagate=False) for h in handles]


@pytest.mark.parametrize('broker', ['rabbitmq', 'redis'])
def test_exclusivity_three_workers(scenario_for, broker):
    s = scenario_for(broker)
    for name in ('w1', 'w2', 'w3'):
        s.worker(name, concurrency=4, wait=False)
    for w in s.workers:
        w.wait_ready()
    rnd = random.Random(7)
    keys = [f'k{i}' for i in range(6)]
    handles = [s.send('work', rnd.choice(keys), rnd.uniform(0, 0.03), i) for i in range(240)]
    assert sorted(results(handles)) == list(range(240))
    runs = s.records.executions()
    assert len(runs) == 240, 'every task executed exactly once'
    assert len({r.id for r in runs}) == 240
    assert all(r.end is not None for r in runs)
    assert overlaps(runs) == []
    assert len({r.worker for r in runs}) == 3, 'all three workers took part'
    # tokens grow with every grant of a key
    for key, key_runs in by_key(runs).items():
        tokens = [r.token for r in key_runs]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_contended_messages_never_enter_the_pool(scenario):
    s = scenario
    w = s.worker('w1', concurrency=4)
    holder = s.send('work', 'hot', 3.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder started')
    waiting = [s.send('work', 'hot', 0.1, i) for i in range(1, 6)]
    other = s.send('work', 'cold', 0.0, 99)
    assert other.get(timeout=20) == 99, 'other keys flow while one is held'
    # The worker has every waiting message (none can be on its way to the pool).
    wait_for(lambda: all(f'[{h.id}] received' in w.log_text() for h in waiting),
             message='the waiting messages received')
    active = s.client.control.inspect([s.nodename(w)], timeout=3).active() or {}
    names = [t['name'] for ts in active.values() for t in ts]
    assert names.count('integration.testapp.work') == 1, names
    assert holder.get(timeout=20) == 0
    assert sorted(results(waiting)) == [1, 2, 3, 4, 5]
    runs = [r for r in s.records.executions() if r.key == 'hot']
    first = runs[0]
    assert first.extra['seq'] == 0
    assert all(r.start >= first.end for r in runs[1:]), 'none started before the holder ended'
    assert len(runs) == 6 and overlaps(runs) == []
    stats = s.client.control.inspect([s.nodename(w)], timeout=3).stats()
    total = list(stats.values())[0]['total']
    assert total['integration.testapp.work'] == 7, 'the pool ran each task once, nothing more'


def test_refinement_runs_different_values_concurrently(scenario):
    s = scenario
    s.worker('w1', concurrency=4)
    handles = [s.send('two_keys', 'a', 'eu', 1.0), s.send('two_keys', 'a', 'us', 1.0),
               s.send('two_keys', 'a', 'eu', 1.0), s.send('two_keys', 'b', kwargs={'duration': 1.0})]
    results(handles)
    runs = s.records.executions()
    assert len(runs) == 4
    eu = [r for r in runs if r.key == 'a/eu']
    us = [r for r in runs if r.key == 'a/us']
    assert len(eu) == 2 and overlaps(eu) == []
    assert us[0].start < eu[0].end and eu[0].start < us[0].end, 'different values overlap'


def test_whole_task_mutex(scenario):
    s = scenario
    s.worker('w1', concurrency=4)
    results([s.send('whole', 0.3) for _ in range(4)])
    runs = s.records.executions()
    assert len(runs) == 4 and overlaps(runs) == []


def test_unbindable_arguments_fail_clearly_and_are_not_requeued(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2)
    bad = s.send('work', kwargs={'nokey': 1})
    with pytest.raises(Exception) as info:
        bad.get(timeout=20)
    assert 'arguments do not match' in str(info.value)
    assert "integration.testapp.work" in str(info.value)
    assert s.send('work', 'ok', 0, 1).get(timeout=20) == 1, 'the worker survives'
    assert s.records.count('start') == 1
    assert 'refused' in w.log_text()
    # A looping message would be unacked, not ready: stopping the worker
    # returns anything unacked to the queue, so count after it.
    w.stop()
    assert len([x for x in w.log_text().splitlines()
                if f'[{bad.id}] received' in x]) == 1, 'delivered once, never again'
    with s.client.connection_for_write() as conn:
        _, count, _ = conn.default_channel.queue_declare(s.queue, passive=True)
    assert count == 0, 'the bad message is not back in the queue'


def test_worker_help_lists_the_flag_and_the_worker_connects_there(scenario):
    out = subprocess.run(
        [sys.executable, '-m', 'celery', '-A', 'integration.testapp', 'worker', '--help'],
        capture_output=True, text=True, env=worker_env(scenario.env()), timeout=60)
    assert out.returncode == 0 and '--mutex-hosts' in out.stdout
    s = scenario
    s.worker('w1', concurrency=2)
    h = s.send('work', 'flag', 2.0, 1)
    path = s.lease_path('work', 'flag')
    wait_for(lambda: s.zk.exists(path), message='the lease node in the flag\'s ZooKeeper')
    assert h.get(timeout=20) == 1


def test_no_lease_left_after_warm_shutdown_and_held_messages_go_back(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2)
    handles = [s.send('work', 'sd', 1.5, i) for i in range(4)]
    wait_for(lambda: s.records.count('start') == 1, message='first holder')
    wait_for(lambda: s.lease_nodes(), message='lease node')
    w.stop()
    assert w.returncode == 0
    assert s.lease_nodes() == [], 'the session closed with the worker'
    s.worker('w2', concurrency=2)
    assert sorted(results(handles)) == [0, 1, 2, 3], 'nothing lost'
    runs = s.records.executions()
    assert overlaps(runs) == [] and len(runs) == 4


def test_a_holder_ending_during_warm_shutdown_releases_its_key_at_once(scenario):
    """The consumer's loop is stopped while the pool finishes its tasks: a release
    must not wait for that loop (or for the worker's exit) to go out."""
    s = scenario
    w = s.worker('w1', concurrency=2)
    short = s.send('work', 'ws-short', 1.0, 0)
    s.send('work', 'ws-long', 8.0, 1)
    wait_for(lambda: s.records.count('start') == 2, message='both holders started')
    short_path = s.lease_path('work', 'ws-short')
    long_path = s.lease_path('work', 'ws-long')
    assert s.zk.exists(short_path) and s.zk.exists(long_path)
    w.terminate()  # warm shutdown: the pool finishes what runs
    assert short.get(timeout=20) == 0
    wait_for(lambda: s.zk.exists(short_path) is None, timeout=5,
             message='the short holder released its key while the worker still runs')
    assert w.is_running() and s.zk.exists(long_path), 'the long holder still runs'
    assert w.wait(timeout=30) == 0
    assert s.lease_nodes() == []


def test_mutex_timeout_still_holds_during_warm_shutdown(scenario):
    """Warm shutdown waits for running tasks with the consumer's loop stopped: a
    holder past its mutex_timeout is still killed, not left running to its end."""
    s = scenario
    w = s.worker('w1', concurrency=2)
    s.send('overrun', 'ws-over', 30.0)  # mutex_timeout=1.5
    wait_for(lambda: s.records.count('start') == 1, message='the holder started')
    w.terminate()
    assert w.wait(timeout=25) == 0, 'the overrunning holder was killed; the worker exited'
    assert 'overran its mutex_timeout' in w.log_text()
    assert s.records.count('end') == 0, 'the holder never ran to its end'
    assert s.lease_nodes() == []


def test_zookeeper_down_at_start(scenario, zk_factory):
    s = scenario
    node = zk_factory(start=False)
    w = s.worker('w1', concurrency=2, hosts=node.hosts)
    guarded = [s.send('work', f'z{i % 2}', 0.05, i) for i in range(6)]
    plain = [s.send('plain', i) for i in range(3)]
    assert results(plain, timeout=20) == [0, 1, 2], 'plain tasks run without ZooKeeper'
    # Every guarded message reached the worker, and it has said why they wait.
    wait_for(lambda: all(f'[{h.id}] received' in w.log_text() for h in guarded),
             message='the guarded messages received')
    wait_for(lambda: 'ZooKeeper' in w.log_text() and 'not reachable' in w.log_text(),
             message='a WARNING about ZooKeeper')
    assert s.records.count('start') == 3, 'no guarded task ran without ZooKeeper'
    assert 'WARNING' in [line for line in w.log_text().splitlines() if 'not reachable' in line][0]
    node.start()
    node.wait_ready()
    assert sorted(results(guarded, timeout=60)) == list(range(6))
    runs = [r for r in s.records.executions() if r.key is not None]
    assert len(runs) == 6 and overlaps(runs) == []


def test_configuration_mistakes_stop_the_worker_at_start(scenario):
    s = scenario
    bad = s.worker('bad', env={'TEST_BAD_OPTION': 'mutex_keys'}, wait=False)
    assert bad.wait(timeout=60) != 0
    assert "task 'integration.testapp.misconfigured': option mutex_keys entry 'missing' " \
           "is not a parameter of the function" in bad.log_text()
    flag = s.worker('flag', hosts='zk1:2181,zk2:notaport', wait=False)
    assert flag.wait(timeout=60) != 0
    assert "--mutex-hosts: bad port 'notaport' in 'zk2:notaport'" in flag.log_text()


@pytest.mark.parametrize('pool', ['threads', 'solo'])
def test_pools_that_cannot_kill_a_holder_are_refused_unless_continue_is_set(scenario, pool):
    """A holder on threads/solo runs in the worker process: on session loss it
    could not be stopped, so it would overlap the next holder."""
    s = scenario
    w = s.worker('w1', concurrency=1, pool=pool, wait=False)
    assert w.wait(timeout=60) != 0
    assert (f"pool '{'thread' if pool == 'threads' else 'solo'}' cannot stop a task whose "
            "lease is lost") in w.log_text()
    assert 'mutex_on_session_loss=continue' in w.log_text()


CONTINUE = ['--mutex-on-session-loss', 'continue']


@pytest.mark.parametrize('pool', ['threads', 'solo'])
def test_other_pools_hold_and_release_leases(scenario, pool):
    s = scenario
    s.worker('w1', concurrency=4 if pool == 'threads' else 1, pool=pool, extra_args=CONTINUE)
    s.worker('w2', concurrency=4 if pool == 'threads' else 1, pool=pool, extra_args=CONTINUE)
    handles = [s.send('work', f'p{i % 3}', 0.05, i) for i in range(24)]
    handles += [s.send('ends', 'pf', 'fail'), s.send('ends', 'pr', 'retry')]
    results(handles, timeout=90)
    runs = [r for r in s.records.executions() if r.task.endswith('.work')]
    assert len(runs) == 24 and overlaps(runs) == []
    wait_for(lambda: s.lease_nodes() == [], timeout=10, message='every lease released')
    assert s.send('ends', 'pf', 'ok').get(timeout=20) is None


def test_eta_tasks_take_their_lease_only_when_due(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2)
    h = s.send('work', 'eta', 0.5, 1, countdown=3)
    path = s.lease_path('work', 'eta')
    # The worker has the message (its ETA timer runs), so a lease would exist now.
    wait_for(lambda: f'[{h.id}] received' in w.log_text(), message='received')
    assert not h.ready(), 'still in its countdown'
    assert not s.zk.exists(path), 'no lease during the countdown'
    assert s.records.count('start') == 0
    assert h.get(timeout=20) == 1
    runs = s.records.executions()
    assert len(runs) == 1 and runs[0].token is not None


def test_rate_limited_guarded_tasks(scenario):
    s = scenario
    s.worker('w1', concurrency=4)
    handles = [s.send('limited_rate', 'rl', 0.2, i) for i in range(4)]
    assert sorted(results(handles)) == [0, 1, 2, 3]
    runs = s.records.executions()
    assert len(runs) == 4 and overlaps(runs) == []


def test_a_non_json_key_value_in_a_real_message_fails_once_and_is_not_requeued(scenario):
    # A pickled message can carry a key value canonical JSON cannot encode.
    s = scenario
    w = s.worker('w1', concurrency=2, env={'TEST_ACCEPT': 'json,pickle',
                                                 'C_FORCE_ROOT': '1'})  # CI runs as root
    bad = s.send('work', {1, 2}, 0, 0, serializer='pickle')
    with pytest.raises(Exception) as failed:
        bad.get(timeout=20)
    assert bad.state == 'FAILURE'
    # A clear error naming the task and the parameter, in the log and in the result.
    name = f"task '{s.app_module}.work'"
    line = [x for x in w.log_text().splitlines() if f'[{bad.id}] refused' in x]
    assert line and 'ERROR' in line[0] and name in line[0] and "parameter 'key'" in line[0], line
    assert name in str(failed.value) and 'JSON' in str(failed.value), failed.value
    assert s.send('work', 'ok', 0, 1).get(timeout=20) == 1, 'the worker survives'
    w.stop()
    assert len([x for x in w.log_text().splitlines()
                if f'[{bad.id}] received' in x]) == 1, 'delivered once, never again'
    assert [r for r in s.records.executions() if r.extra.get('seq') == 0] == []
    with s.client.connection_for_write() as conn:
        _, count, _ = conn.default_channel.queue_declare(s.queue, passive=True)
    assert count == 0, 'the bad message is not back in the queue'
