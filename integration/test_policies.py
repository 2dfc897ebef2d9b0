"""The contention policies of issue 13 on real workers, ZooKeeper and brokers:
wait deadlines (``mutex_wait_timeout``), ``'coalesce'``, ``'replace'``, their
events, and each under a worker SIGKILL and a ZooKeeper outage: no overlap,
nothing lost except what a policy drops, and that visibly."""
import time

import pytest

from celery_mutex_bootstep.keys import key_digest
from celery_mutex_bootstep.parking import park_queue_name

from .records import overlaps
from .scenario import wait_for
from .faults import (  # noqa: F401  (watch_factory: a fixture used below)
    SESSION_TIMEOUT, assert_no_overlap, session_args, watch_factory)

APP = 'integration.policyapp'


@pytest.fixture
def policy_scenario(scenario_for):
    def make(broker='rabbitmq'):
        s = scenario_for(broker)
        s.app_module = APP
        return s
    return make


def queue_count(s, name):
    with s.client.connection_for_write() as conn:
        _, count, _ = conn.default_channel.queue_declare(name, passive=True)
    return count


def mutex_info(s, worker):
    replies = s.client.control.inspect([s.nodename(worker)], timeout=3)._request('mutex_leases') or {}
    return list(replies.values())[0]


def failure(handle, timeout=30):
    with pytest.raises(Exception) as info:
        handle.get(timeout=timeout)
    return info.value


@pytest.mark.parametrize('broker', ['rabbitmq', 'redis'])
def test_waiters_past_their_wait_timeout_fail_visibly_in_the_room_and_parked(
        policy_scenario, broker):
    s = policy_scenario(broker)
    w = s.worker('w1', concurrency=4)
    holder = s.send('impatient', 'wt', 6.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    sent = time.monotonic()
    # 2 wait in the consumer (mutex_limit + 1), the others are parked
    waiters = [s.send('impatient', 'wt', 0, i) for i in range(1, 7)]
    ended = []
    for h in waiters:
        exc = failure(h)
        ended.append(time.monotonic() - sent)
        assert type(exc).__name__ == 'MutexContended', repr(exc)
        assert 'mutex_wait_timeout of 1.5s' in str(exc) and 'wt' in str(exc)
        assert h.state == 'FAILURE'
    assert max(ended) < 4.5, f'failed at {ended}: not at their deadline (the holder runs 6 s)'
    assert min(ended) >= 1.4, f'failed at {ended}: before their deadline'
    assert holder.get(timeout=20) == 0
    assert s.records.count('start') == 1, 'a waiter ran after its deadline'
    log = w.log_text()
    for h in waiters:
        line = [x for x in log.splitlines() if h.id in x and 'mutex_wait_timeout' in x]
        assert line and 'WARNING' in line[0] and "key='wt'" in line[0], h.id
    assert mutex_info(s, w)['counters']['wait_timeout'] == 6
    if broker == 'rabbitmq':  # every message acked: none left in either queue
        digest = key_digest(f'{APP}.impatient', ('wt',))
        assert queue_count(s, s.queue) == 0
        assert queue_count(s, park_queue_name(s.namespace, digest)) == 0


def test_a_waiter_within_its_wait_timeout_runs_and_a_shared_mutex_name_counts_per_task(
        policy_scenario):
    s = policy_scenario()
    s.worker('w1', concurrency=4)
    # ledger_patient holds 'ledger/7' for 2.5 s: the patient waiter runs after it,
    # the impatient one (1 s) fails; on a key held 0.3 s the impatient one runs.
    holder = s.send('ledger_patient', 7, 2.5, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    patient = s.send('ledger_patient', 7, 0, 1)
    impatient = s.send('ledger_impatient', 7, 0, 2)
    quick_holder = s.send('impatient', 'q', 0.3, 3)
    quick = s.send('impatient', 'q', 0, 4)
    assert quick.get(timeout=20) == 4 and quick_holder.get(timeout=20) == 3
    exc = failure(impatient)
    assert type(exc).__name__ == 'MutexContended' and 'mutex_wait_timeout of 1s' in str(exc)
    assert holder.get(timeout=20) == 0 and patient.get(timeout=20) == 1
    runs = s.records.executions()
    assert sorted(r.extra['seq'] for r in runs) == [0, 1, 3, 4]
    assert overlaps([r for r in runs if r.key == 'ledger/7']) == []
    assert overlaps([r for r in runs if r.key == 'q']) == []


# -- mutex_contended='coalesce' ------------------------------------------------------

@pytest.mark.parametrize('broker', ['rabbitmq', 'redis'])
def test_coalesce_keeps_one_waiting_the_newest_and_supersedes_the_others_visibly(
        policy_scenario, broker):
    s = policy_scenario(broker)
    w = s.worker('w1', concurrency=4)
    holder = s.send('refresh', 'c', 2.5, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    calls = []
    for i in range(1, 6):
        calls.append(s.send('refresh', 'c', 0.2, i))
        time.sleep(0.1)  # arrival order at the gate is the publish order
    assert holder.get(timeout=20) == 0
    assert calls[-1].get(timeout=20) == 5
    for h in calls[:-1]:
        with pytest.raises(Exception) as info:
            h.get(timeout=20)
        assert type(info.value).__name__ == 'TaskRevokedError', repr(info.value)
        assert 'superseded by' in str(info.value), str(info.value)
        assert h.state == 'REVOKED'
    runs = s.records.executions()
    assert sorted(r.extra['seq'] for r in runs) == [0, 5], 'only the holder and the newest ran'
    assert overlaps(runs) == []
    log = w.log_text()
    for older, newer in zip(calls, calls[1:]):
        line = [x for x in log.splitlines() if f'[{older.id}] superseded by' in x]
        assert line and newer.id in line[0] and 'WARNING' in line[0], older.id
    assert mutex_info(s, w)['counters']['superseded'] == 4
    if broker == 'rabbitmq':
        assert queue_count(s, s.queue) == 0, 'superseded messages were not acked'


def test_coalesce_with_a_shared_mutex_name_and_a_free_key_runs_everything(policy_scenario):
    s = policy_scenario()
    s.worker('w1', concurrency=4)
    # different accounts never coalesce; calls of a free key run
    handles = [s.send('refresh_account', a, 0.3, a) for a in range(4)]
    assert sorted(h.get(timeout=20) for h in handles) == [0, 1, 2, 3]
    later = s.send('refresh_account', 0, 0, 10)
    assert later.get(timeout=20) == 10
    runs = s.records.executions()
    assert len(runs) == 5
    assert overlaps([r for r in runs if r.key == 'accounts/0']) == []


# -- mutex_contended='replace' -------------------------------------------------------

def last_ticks(s):
    """seq -> the time of its last record (start, tick or end)."""
    last = {}
    for r in s.records.raw():
        seq = r.get('seq')
        last[seq] = max(last.get(seq, 0), r['t'])
    return last


def revoked_reason(handle):
    with pytest.raises(Exception) as info:
        handle.get(timeout=30)
    assert type(info.value).__name__ == 'TaskRevokedError', repr(info.value)
    assert handle.state == 'REVOKED'
    return str(info.value)


def test_replace_stops_the_older_holder_drops_the_older_waiter_and_runs_the_newest(
        policy_scenario):
    s = policy_scenario()
    w = s.worker('w1', concurrency=4)
    holder = s.send('recompute', 'r', 30.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    first = s.send('recompute', 'r', 30.0, 1)       # replaces the holder, then runs
    wait_for(lambda: s.records.count('start') == 2, timeout=20, message='first replacement ran')
    second = s.send('recompute', 'r', 0.5, 2)       # replaces `first`, waits...
    time.sleep(0.05)
    third = s.send('recompute', 'r', 0.5, 3)        # ...and is superseded by this one
    assert third.get(timeout=30) == 3
    assert revoked_reason(holder).startswith(f'replaced by {first.id}')
    assert revoked_reason(first).startswith(f'replaced by {second.id}')
    reason = revoked_reason(second)
    assert reason.startswith(f'superseded by {third.id}') or reason.startswith(
        f'replaced by {third.id}'), reason
    runs = {r.extra['seq']: r for r in s.records.executions()}
    assert 2 not in runs or runs[2].end is None
    # exclusion: each stopped holder's last record is before the next one started
    last = last_ticks(s)
    order = sorted(runs.values(), key=lambda r: r.start)
    for a, b in zip(order, order[1:]):
        assert last[a.extra['seq']] <= b.start, (a.extra['seq'], b.extra['seq'])
    assert runs[3].end is not None and runs[0].end is None and runs[1].end is None
    log = w.log_text()
    assert f'[{holder.id}] replaced by {first.id}' in log
    assert mutex_info(s, w)['counters']['replaced'] >= 2
    assert queue_count(s, s.queue) == 0


def test_replace_stops_a_holder_running_on_another_worker(policy_scenario):
    s = policy_scenario()
    w1 = s.worker('w1', concurrency=2)
    other = f'{s.queue}-b'
    w2 = s.worker('w2', concurrency=2, extra_args=['-Q', other])
    holder = s.send('recompute', 'x', 30.0, 0)              # runs on w1
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    data, _ = s.zk.get(s.lease_path('recompute', 'x'))
    assert b'"contended":"replace"' in data, data  # what `celery mutex list` shows
    newer = s.client.send_task(f'{APP}.recompute', args=('x', 0.3, 1),
                               queue=other)                 # arrives at w2
    assert newer.get(timeout=30) == 1
    assert revoked_reason(holder).startswith(f'replaced by {newer.id}')
    runs = {r.extra['seq']: r for r in s.records.executions()}
    assert runs[0].worker != runs[1].worker
    assert last_ticks(s)[0] <= runs[1].start, 'the new call ran while the old one still ran'
    assert 'asking' in w2.log_text() and f'[{holder.id}] replaced by' in w1.log_text()


# -- events: what monitors see ---------------------------------------------------------

def test_policy_events_reach_a_receiver_and_monitors_see_failed_and_revoked(policy_scenario):
    from .test_events import EventCapture
    s = policy_scenario()
    capture = EventCapture(s.client).start()
    try:
        s.worker('w1', concurrency=4, extra_args=['-E'])
        holder = s.send('impatient', 'ev', 3.0, 0)
        busy = s.send('refresh', 'co', 3.0, 0)
        doomed = s.send('recompute', 're', 30.0, 0)
        for h in (holder, busy, doomed):
            capture.wait('task-started', h.id)
        late = s.send('impatient', 'ev', 0, 1)
        older = s.send('refresh', 'co', 0, 1)
        time.sleep(0.2)
        newer = s.send('refresh', 'co', 0, 2)
        winner = s.send('recompute', 're', 0, 1)

        timeout_event = capture.wait('mutex-wait-timeout', late.id)[0]
        assert "key='ev'" in timeout_event['mutex'] and timeout_event['waited'] >= 1.4
        superseded = capture.wait('mutex-superseded', older.id)[0]
        assert superseded['by'] == newer.id
        replaced = capture.wait('mutex-replaced', doomed.id)[0]
        assert replaced['by'] == winner.id
        capture.wait('task-failed', late.id)
        capture.wait('task-revoked', older.id)
        capture.wait('task-revoked', doomed.id)
        assert winner.get(timeout=30) == 1 and newer.get(timeout=30) == 2
        # what Flower shows (celery.events.state.State)
        state = capture.state.tasks
        assert state[late.id].state == 'FAILURE'
        assert state[older.id].state == 'REVOKED'
        assert state[doomed.id].state == 'REVOKED'
    finally:
        capture.stop()


# -- a worker SIGKILLed ----------------------------------------------------------------

def test_a_coalesced_waiter_of_a_killed_worker_runs_elsewhere_not_lost(policy_scenario):
    s = policy_scenario()
    args = ['--mutex-session-timeout', '4']
    a = s.worker('a', concurrency=2, extra_args=args)
    holder = s.send('refresh', 'k', 60.0, 0)  # acked at start: dies with its worker
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    waiter = s.send('refresh', 'k', 0.2, 1)
    wait_for(lambda: mutex_info(s, a)['waiting'], message='the waiter held on a')
    a.kill()
    a.kill_group()
    b = s.worker('b', concurrency=2, extra_args=args)
    # unacknowledged, it came back from the broker; the dead session's lease vanished
    assert waiter.get(timeout=40) == 1
    runs = [r for r in s.records.executions() if r.extra['seq'] == 1]
    assert len(runs) == 1 and runs[0].worker == s.nodename(b)
    assert holder.state != 'SUCCESS'


def test_parked_waiters_of_a_killed_worker_fail_at_their_deadline_on_another(policy_scenario):
    s = policy_scenario()
    args = ['--mutex-session-timeout', '4']
    a = s.worker('a', concurrency=2, extra_args=args)
    s.send('impatient', 'p', 60.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    waiters = [s.send('impatient', 'p', 0, i) for i in range(1, 7)]
    wait_for(lambda: mutex_info(s, a)['counters']['parked'] >= 4, message='4 parked')
    a.kill()
    a.kill_group()
    s.worker('b', concurrency=2, extra_args=args)
    outcomes = []
    for h in waiters:  # nothing lost: each ends, as a run or as a visible failure
        try:
            outcomes.append(h.get(timeout=40))
        except Exception as exc:
            assert type(exc).__name__ == 'MutexContended', repr(exc)
            assert 'mutex_wait_timeout' in str(exc)
            outcomes.append('timeout')
    # The parked copies carry their first wait: the line no live worker followed
    # was restarted by b's sweep and failed without running. (The two waiters a
    # kept in its consumer came back as the broker's originals: their wait
    # started again on b.)
    assert outcomes.count('timeout') >= 4, outcomes
    runs = [r for r in s.records.executions() if r.extra['seq'] != 0]
    assert len(runs) == len([o for o in outcomes if o != 'timeout'])
    assert overlaps(runs) == []


# -- a ZooKeeper session lost ------------------------------------------------------------


def ended(handle, timeout=60):
    """'ok', or the policy's visible ending ('superseded' / 'replaced'); anything
    else (lost, stuck, another error) fails."""
    try:
        handle.get(timeout=timeout)
        return 'ok'
    except Exception as exc:
        text = str(exc)
        assert type(exc).__name__ == 'TaskRevokedError' and text.startswith(
            ('superseded by', 'replaced by')), repr(exc)
        return text.split()[0]


def test_coalesce_and_replace_across_a_zookeeper_outage_lose_nothing_and_never_overlap(
        zk_factory, watch_factory, policy_scenario):
    s = policy_scenario()
    node = zk_factory()
    s.zk_hosts = node.hosts
    s.worker('a', concurrency=3, hosts=node.hosts, extra_args=session_args())
    watch = watch_factory(s)
    holders = [s.send('refresh', 'z', 6.0, 0), s.send('recompute', 'y', 6.0, 0)]
    wait_for(lambda: s.records.count('start') == 2, message='holders')
    waiters = [s.send('refresh', 'z', 0.3, 1)]
    time.sleep(0.3)
    t_stop = time.time()
    node.stop()
    time.sleep(2 * SESSION_TIMEOUT)  # the session is given up: the holders are killed
    node.start()
    node.wait_ready()
    outcomes = {h.id: ended(h) for h in holders + waiters}
    test_end = time.time()
    runs = s.records.executions()
    assert_no_overlap(runs, watch, test_end, t0=t_stop)
    # every call ran to its end or was dropped visibly by its policy
    done = {r.id for r in runs if r.end is not None}
    for h in holders + waiters:
        assert outcomes[h.id] != 'ok' or h.id in done, (h.id, outcomes)
    assert outcomes[holders[1].id] == 'ok', 'the replace holder killed with the session ran again'
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
