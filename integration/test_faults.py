"""ZooKeeper faults on real services: servers restarted, outages longer than the session,
an ensemble's leader killed and quorum lost, workers cut off from ZooKeeper, frozen or
answered late, and `mutex_on_session_loss='continue'`.

Unless said otherwise a test asserts no overlap per key (every execution interval counts,
integration/faults.py) and no lost task (every task has a completed execution).
"""
import time

import pytest

from .scenario import wait_for
from .faults import (  # noqa: F401  (fixtures)
    SESSION_TIMEOUT, SESSION_GIVEN_UP, HOLDER_KILLED, session_args, overlapping, describe,
    assert_no_overlap, assert_no_overlap_until_stopped, wait_completed,
    assert_results_succeeded, mutex_log, log_lines, lease_stats, proxy_factory, watch_factory,
    _started)

pytestmark = pytest.mark.faults  # make faults (integration/conftest.py)


# =========================================================================== 1

def test_zookeeper_restarted_within_the_session_timeout_keeps_the_session(
        zk_factory, watch_factory, scenario):
    """A crashed ZooKeeper back within the session timeout: the same session, the same
    lease nodes, nothing killed, nothing run twice."""
    # Room for a JVM restart (~1-1.5 s) and kazoo's reconnect backoff (<= 1 s) within
    # the deadline (timeout - 2.5 s), also on a loaded machine.
    timeout = 10
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    w = s.worker('w1', concurrency=4, hosts=node.hosts, extra_args=session_args(timeout))
    watch = watch_factory(s)
    keys = ['r0', 'r1', 'r2']
    holders = [s.send('work', k, 9.0, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in holders})) == 3, message='holders running')
    queued = [s.send('work', k, 0.2, 10 + i) for i, k in enumerate(keys * 3)]
    paths = [s.lease_path('work', k) for k in keys]
    before = lease_stats(node.hosts, paths)
    assert all(before.values()), before
    time.sleep(0.5)

    t0 = time.time()
    node.kill()
    node.start()
    node.wait_ready()
    outage = time.time() - t0
    margin = max(0.5, 0.25 * timeout)
    assert outage < timeout - margin - 1.0, (
        f'precondition: the restart took {outage:.1f}s, too slow for this test')

    after = lease_stats(node.hosts, paths)
    lost = [line for line in w.log_text().splitlines()
            if 'ERROR' in line and ('session' in line or 'lease' in line)]
    for p in paths:
        assert after[p] is not None, (
            f'lease node {p} gone after the restart\n{mutex_log([w])}\n'
            f'--- zookeeper:\n{node.log_tail(30)}')
        assert (after[p].ephemeralOwner, after[p].czxid) == (
            before[p].ephemeralOwner, before[p].czxid), (
            f'{p}: owner/czxid {before[p].ephemeralOwner:#x}/{before[p].czxid} before, '
            f'{after[p].ephemeralOwner:#x}/{after[p].czxid} after: a new session\n'
            f'{mutex_log([w])}')

    runs = wait_completed(s, holders + queued, timeout=40, workers=[w])
    test_end = time.time()
    assert_results_succeeded(holders + queued)
    assert lost == [] and log_lines(w, 'lost') == [], '\n'.join(log_lines(w, 'lost'))
    assert all(r.end is not None for r in runs), 'an execution was killed:\n' + '\n'.join(
        describe(r, watch) for r in runs if r.end is None)
    assert sorted(r.id for r in runs) == sorted(h.id for h in holders + queued), \
        'every task ran exactly once'
    held = [r for r in runs if r.id in {h.id for h in holders}]
    assert all(r.start < t0 and r.end > t0 + outage for r in held), 'holders ran through it'
    assert_no_overlap(runs, watch, test_end)
    wait_for(lambda: s.lease_nodes() == [], timeout=10, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 2

def test_zookeeper_down_longer_than_the_session_timeout(zk_factory, watch_factory, scenario):
    """ZooKeeper stopped for twice the session timeout while three workers hold long
    tasks: the sessions are given up, the holders killed and run again from the start;
    nothing overlaps, nothing is lost."""
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    for name in ('a', 'b', 'c'):
        s.worker(name, concurrency=3, hosts=node.hosts, extra_args=session_args(), wait=False)
    for w in s.workers:
        w.wait_ready()
    watch = watch_factory(s)
    long_duration = 7.0
    keys = [f'd{i}' for i in range(6)]
    longs = [s.send('work', k, long_duration, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in longs})) == 6, timeout=20,
             message='six long tasks running')
    first = _started(s, {h.id for h in longs})
    holding = {r.worker for r in first.values()}
    assert len(holding) >= 2, f'precondition: several workers hold tasks, got {holding}'
    queued = [s.send('work', k, 0.3, 100 + i) for i, k in enumerate(keys * 2)]
    time.sleep(0.5)

    t_stop = time.time()
    node.stop()
    time.sleep(2 * SESSION_TIMEOUT)
    node.start()
    node.wait_ready()
    t_back = time.time()

    runs = wait_completed(s, longs + queued, timeout=60, workers=s.workers)
    test_end = time.time()
    assert_results_succeeded(longs + queued)
    assert_no_overlap(runs, watch, test_end, t0=t_stop)
    for w in s.workers:
        if s.nodename(w) in holding:
            assert log_lines(w, SESSION_GIVEN_UP), f'{w.hostname}: no session-lost ERROR\n' \
                + mutex_log([w])
            assert log_lines(w, HOLDER_KILLED), f'{w.hostname}: no holder killed\n' \
                + mutex_log([w])
    for h in longs:
        mine = sorted((r for r in runs if r.id == h.id), key=lambda r: r.start)
        killed = mine[0]
        assert killed.end is None, f'{describe(killed)} was not killed'
        died = watch.died_at(killed.pid, killed.start)
        assert died is not None and t_stop < died < t_back, (
            f'{describe(killed, watch, t_stop)}: its process should have died during '
            f'the outage (0..{t_back - t_stop:.1f})')
        again = [r for r in mine[1:] if r.end is not None]
        assert again, f'{h.id} never ran again'
        assert again[0].start >= died
        assert again[0].end - again[0].start >= long_duration - 0.05, 'ran from the start'
    for h in queued:  # no grant while ZooKeeper was down: these ran once, afterwards
        mine = [r for r in runs if r.id == h.id]
        assert len(mine) == 1 and mine[0].start > t_back, [describe(r) for r in mine]
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 3

def test_ensemble_leader_killed_then_quorum_lost_and_regained(zk_ensemble, watch_factory,
                                                              scenario):
    s = scenario
    ens = zk_ensemble
    s.zk_hosts = ens.hosts
    for name in ('a', 'b'):
        s.worker(name, concurrency=3, hosts=ens.hosts, extra_args=session_args(), wait=False)
    for w in s.workers:
        w.wait_ready()
    watch = watch_factory(s)
    keys = [f'e{i}' for i in range(5)]
    handles = []

    def batch(n, lo, hi, seq0):  # work and work_late are two locks per key
        return [s.send('work_late' if i % 2 else 'work', keys[(i // 2) % len(keys)],
                       lo + (hi - lo) * ((i * 7) % 10) / 10, seq0 + i) for i in range(n)]

    # --- the leader dies mid-run
    first = batch(30, 0.1, 0.5, 0)
    handles += first
    wait_for(lambda: s.records.count('start') >= 5, message='workload running')
    leader = ens.leader()
    assert leader is not None
    t_kill = time.time()
    leader.kill()
    during = batch(20, 0.05, 0.2, 100)
    handles += during
    # the workload continues on the two remaining nodes
    wait_completed(s, first + during, timeout=45, workers=s.workers)
    assert not leader.is_running()
    assert ens.leader() not in (None, leader)
    leader.start()
    ens.wait_ready(60)

    # --- quorum lost (two of three stopped) for twice the session timeout
    holders = [s.send('work_late', f'q{i}', 6.0, 200 + i) for i in range(4)]
    handles += holders
    wait_for(lambda: len(_started(s, {h.id for h in holders})) == 4, timeout=20,
             message='holders running')
    handles += batch(10, 0.05, 0.2, 300)
    stopped = [n for n in ens.nodes if n is not ens.leader()][:1] + [ens.leader()]
    t_loss = time.time()
    for n in stopped:
        n.stop()
    t_lost = time.time()  # certainly no quorum from here on
    time.sleep(2 * SESSION_TIMEOUT)
    for n in stopped:
        n.start()
    ens.wait_ready(60)
    t_back = time.time()

    runs = wait_completed(s, handles, timeout=75, workers=s.workers)
    test_end = time.time()
    assert_results_succeeded(handles)
    assert_no_overlap(runs, watch, test_end, t0=t_kill)
    # while the quorum was lost nothing was granted: whatever started then
    # (a pool is slow to start what it was handed) holds a lease granted
    # before the loss, so a token lower than every one issued after it.
    started_meanwhile = [r for r in runs if t_lost < r.start < t_back]
    after = [r.token for r in runs if r.start > t_back and r.token is not None]
    for r in started_meanwhile:
        assert r.token is not None and (not after or r.token < min(after)), (
            describe(r, watch, t_loss))
    print('started after the quorum loss, under earlier grants: '
          + (', '.join(f'{r.start - t_lost:.3f}s' for r in started_meanwhile) or 'none'))
    # the holders could not keep running without a lease: killed, then run again
    for h in holders:
        mine = sorted((r for r in runs if r.id == h.id), key=lambda r: r.start)
        assert mine[0].end is None, f'{describe(mine[0], watch, t_loss)} was not stopped'
        assert any(r.end is not None and r.start > t_back for r in mine[1:])
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 6

def test_worker_cut_off_from_zookeeper_stops_its_holders_before_others_acquire(
        zk_factory, proxy_factory, watch_factory, scenario):
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    proxy = proxy_factory(node)
    a = s.worker('a', concurrency=3, hosts=proxy.hosts, extra_args=session_args())
    watch = watch_factory(s)
    keys = ['p0', 'p1', 'p2']
    long_duration = 10.0
    longs = [s.send('work', k, long_duration, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in longs})) == 3, message='holders on a')
    b = s.worker('b', concurrency=3, hosts=node.hosts, extra_args=session_args())
    queued = [s.send('work', k, 0.3, 10 + i) for i, k in enumerate(keys * 2)]
    time.sleep(1.0)
    a_name, b_name = s.nodename(a), s.nodename(b)
    assert not [r for r in s.records.executions() if r.worker == b_name], 'keys held by a'

    t_stall = time.time()
    proxy.stall()
    time.sleep(2 * SESSION_TIMEOUT)
    proxy.resume()
    t_resume = time.time()

    runs = wait_completed(s, longs + queued, timeout=60, workers=[a, b])
    test_end = time.time()
    assert_results_succeeded(longs + queued)
    assert_no_overlap(runs, watch, test_end, t0=t_stall)
    assert log_lines(a, SESSION_GIVEN_UP) and log_lines(a, HOLDER_KILLED), mutex_log([a])
    for h, k in zip(longs, keys):
        held = sorted((r for r in runs if r.id == h.id), key=lambda r: r.start)[0]
        assert held.worker == a_name and held.end is None, describe(held, watch, t_stall)
        died = watch.died_at(held.pid, held.start)
        assert died is not None and t_stall < died < t_resume, describe(held, watch, t_stall)
        later_b = [r for r in runs if r.key == k and r.worker == b_name and r.start > held.start]
        assert later_b, f'b never acquired {k} while a was cut off'
        first_b = min(r.start for r in later_b)
        assert first_b >= died, (
            f'b started {k} at {first_b - t_stall:.3f}s, a\'s holder died at '
            f'{died - t_stall:.3f}s')
        assert first_b < t_resume, f'b did not take {k} over while a was cut off'
        print(f'{k}: a\'s holder started {held.start - t_stall:+.3f}s, died '
              f'{died - t_stall:+.3f}s; b acquired {first_b - t_stall:+.3f}s '
              f'(stall 0..{t_resume - t_stall:.3f}s)')
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 7

def test_frozen_worker_grants_nothing_under_its_dead_session(watch_factory, scenario):
    """SIGSTOP past the session timeout. Overlap is not asserted (the documented limit:
    a frozen holder runs on for a moment when it wakes up); the fencing token is.

    Every pool process of p is busy with a long holder, so the grants p makes ahead
    (one per process) wait, granted under the session about to die and not started,
    when p freezes: on waking, none of them may start under it."""
    s = scenario
    p = s.worker('p', concurrency=3, extra_args=session_args())
    watch = watch_factory(s)
    keys = ['f0', 'f1', 'f2']
    longs = [s.send('fenced_patient', k, 10.0, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in longs})) == 3, message='holders on p')
    q = s.worker('q', concurrency=3, extra_args=session_args())
    p_name, q_name = s.nodename(p), s.nodename(q)
    held = {r.key: r for r in _started(s, {h.id for h in longs}).values()}
    assert all(r.worker == p_name for r in held.values())
    old_sessions = {r.extra['session'] for r in held.values()}
    assert len(old_sessions) == 1 and None not in old_sessions
    old_session = next(iter(old_sessions))

    # Short tasks on free keys: p grants some ahead, which wait for a process.
    others = [s.send('fenced_patient', f'g{i}', 0.0, 100 + i) for i in range(30)]
    other_paths = {s.lease_path('fenced_patient', f'g{i}'): h for i, h in enumerate(others)}

    def pending_grants():
        """Others whose lease node p's current session holds, not started yet."""
        started = {r.id for r in s.records.executions()}
        out = []
        for path, h in other_paths.items():
            stat = s.zk.exists(path)
            if stat is not None and stat.ephemeralOwner == old_session and h.id not in started:
                out.append(h)
        return out
    pending = wait_for(pending_grants, message='grants ahead under the old session')
    t_pause = time.time()
    p.pause()
    pending = [h for h in pending if h.id not in {r.id for r in s.records.executions()}]
    assert pending, 'precondition: a grant of the old session waits for a process'
    # work for the held keys while p is frozen: q takes it once p's session expired
    during = [s.send('fenced_patient', k, 3.0, 30 + i) for i, k in enumerate(keys * 2)]
    taken = wait_for(lambda: [r for r in s.records.executions() if r.worker == q_name
                              and r.key in keys and r.start > t_pause],
                     timeout=6 * SESSION_TIMEOUT, message='q taking a held key over')
    t_resume = time.time()
    p.resume()

    handles = longs + others + during
    runs = wait_completed(s, handles, timeout=60, workers=[p, q])
    test_end = time.time()
    assert_results_succeeded(handles)
    assert log_lines(p, SESSION_GIVEN_UP) or log_lines(p, HOLDER_KILLED), mutex_log([p])
    for k, paused in held.items():  # the frozen holders were killed when p woke
        died = watch.died_at(paused.pid, paused.start)
        assert paused.end is None and died is not None and died >= t_resume, (
            describe(paused, watch, t_pause))
    after = [r for r in runs if r.worker == p_name and r.start > t_resume]
    stale = [r for r in runs if r.extra.get('session') == old_session and r.start > t_pause]
    assert stale == [], 'started under the dead session:\n' + '\n'.join(
        describe(r, watch, t_pause) for r in stale)
    for h in pending:  # ran, later, under a session of its own
        mine = [r for r in runs if r.id == h.id]
        assert mine and all(r.extra.get('session') != old_session for r in mine), mine
    for r in after:  # nothing p started after waking overlaps another holder of the key
        clash = [(a, b) for _, a, b in overlapping(runs, watch, test_end) if r in (a, b)]
        assert clash == [], '\n'.join(
            f'{describe(a, watch, t_pause)}\n{describe(b, watch, t_pause)}' for a, b in clash)
    for k, paused in held.items():
        later = [r for r in runs if r.key == k and r.start > paused.start]
        assert later, f'nobody held {k} after p'
        nxt = min(later, key=lambda r: r.start)
        assert nxt.token > paused.token, (describe(paused), describe(nxt))
        print(f'{k}: paused holder {describe(paused, watch, t_pause)}\n'
              f'    next holder {describe(nxt, watch, t_pause)} (resumed at '
              f'{t_resume - t_pause:.3f})')
    print(f'{len(pending)} grant(s) of the old session pending at the pause; q took over '
          f'{len({r.key for r in taken})} held key(s) while p was frozen; {len(after)} '
          'executions started on p after it woke, none under the old session')
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')


# =========================================================================== 6b

def test_reconnect_answered_late_does_not_outlive_the_server_session(
        zk_factory, proxy_factory, watch_factory, scenario):
    """The session deadline must count from when the server last heard from the
    worker, not from when an answer reached it. Here the worker reconnects, the server
    accepts (and so last hears from it) at once, but the answer is held for 2.2 s by the
    network; then nothing from the worker reaches the server any more. The server
    expires the session ~4 s after accepting it and another worker takes the keys: the
    first worker's holders must be dead by then."""
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    proxy = proxy_factory(node)
    a = s.worker('a', concurrency=3, hosts=proxy.hosts, extra_args=session_args())
    watch = watch_factory(s)
    keys = ['h0', 'h1']
    longs = [s.send('fenced_patient', k, 8.0, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in longs})) == 2, message='holders on a')
    # b consumes a queue of its own, so the keys' next tasks wait at b (not in a's
    # consumer) with a watch (fenced_patient): b takes a key the moment it is free
    b_queue = s.queue + '-b'
    s.extra_queues.append(b_queue)
    b = s.worker('b', concurrency=3, hosts=node.hosts, extra_args=session_args(),
                 env={'TEST_QUEUE': b_queue})
    queued = [s.client.send_task(f'{s.app_module}.fenced_patient', args=(k, 0.3, 10 + i),
                                 queue=b_queue) for i, k in enumerate(keys * 2)]
    wait_for(lambda: all(f'[{h.id}] received' in b.log_text() for h in queued),
             message='the next tasks waiting at b')
    a_name, b_name = s.nodename(a), s.nodename(b)

    proxy.stall('down')
    t_cut = time.time()
    assert proxy.sever() >= 1  # a reconnects at once: its handshake gets through...
    time.sleep(2.2)            # ...its answer is held (less than the deadline left)
    proxy.stall('up')          # from now on nothing from a reaches the server
    proxy.resume('down')       # and the answer arrives
    t_answer = time.time()
    time.sleep(2 * SESSION_TIMEOUT)
    t_heal = time.time()
    proxy.resume()

    runs = wait_completed(s, longs + queued, timeout=60, workers=[a, b])
    test_end = time.time()
    assert_results_succeeded(longs + queued)
    taken_over = {}
    for k in keys:
        held = min((r for r in runs if r.key == k), key=lambda r: r.start)
        later_b = [r for r in runs if r.key == k and r.worker == b_name and r.start > held.start]
        died = watch.died_at(held.pid, held.start)
        print(f'{k}: a\'s holder started {held.start - t_cut:+.3f}s, died '
              f'{"?" if died is None else f"{died - t_cut:+.3f}s"}; b started '
              f'{min(r.start for r in later_b) - t_cut:+.3f}s '
              f'(answer released {t_answer - t_cut:.3f}s)' if later_b else f'{k}: b never ran')
        assert held.worker == a_name and held.end is None, describe(held, watch, t_cut)
        assert died is not None, f'a\'s holder never died: {describe(held, watch, t_cut)}'
        # The server expired a's session during the cut: b takes the key over then,
        # not only once the network healed, and only after a's holder was dead.
        first_b = min((r.start for r in later_b), default=None)
        taken_over[k] = first_b is not None and died <= first_b < t_heal
    assert all(taken_over.values()), f'b did not take over during the cut: {taken_over}'
    try:
        assert_no_overlap(runs, watch, test_end, t0=t_cut)
    except AssertionError as exc:
        expiry = [x for x in node.log_text().splitlines() if 'Expiring session' in x]
        cut = time.strftime('%H:%M:%S', time.localtime(t_cut)) + f'.{int(t_cut % 1 * 1000):03d}'
        raise AssertionError(
            f'{exc}\n(times from the cut at {cut}; answer released {t_answer - t_cut:.3f}s)\n'
            '--- zookeeper:\n' + '\n'.join(expiry) + '\n' + mutex_log([a])) from None
    assert log_lines(a, HOLDER_KILLED), mutex_log([a])
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


def test_on_session_loss_continue_lets_the_holder_finish(zk_factory, proxy_factory, scenario):
    # mutex_on_session_loss='continue': a holder whose session is lost runs
    # to its end (without exclusivity), is not killed and does not run again.
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    proxy = proxy_factory(node)
    a = s.worker('a', concurrency=2, hosts=proxy.hosts,
                 extra_args=session_args() + ['--mutex-on-session-loss', 'continue'])
    h = s.send('work', 'cont', 2 * SESSION_TIMEOUT + 2, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    proxy.stall()
    wait_for(lambda: log_lines(a, SESSION_GIVEN_UP), timeout=3 * SESSION_TIMEOUT,
             message='session given up')
    proxy.resume()
    assert h.get(timeout=30) == 0
    runs = s.records.executions()
    assert len(runs) == 1 and runs[0].end is not None, 'it finished, once'
    assert not log_lines(a, HOLDER_KILLED), mutex_log([a])
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='no lease left')


def test_on_session_loss_continue_still_keeps_a_granted_request_from_starting(
        zk_factory, proxy_factory, scenario):
    # 'continue' lets running holders finish; a request granted under the lost
    # session but not started yet (its process busy) must not start under it:
    # it goes back and runs later under a lease of the new session.
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    proxy = proxy_factory(node)
    a = s.worker('a', concurrency=1, hosts=proxy.hosts,
                 extra_args=session_args() + ['--mutex-on-session-loss', 'continue'])
    h = s.send('work', 'cont-run', 2 * SESSION_TIMEOUT + 2, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    g = s.send('work', 'cont-next', 0.1, 1)  # one lease ahead of the busy process
    path = s.lease_path('work', 'cont-next')
    wait_for(lambda: s.zk.exists(path), message='the next request granted ahead')
    old_token = s.zk.exists(path).czxid
    proxy.stall()
    wait_for(lambda: log_lines(a, SESSION_GIVEN_UP), timeout=3 * SESSION_TIMEOUT,
             message='session given up')
    proxy.resume()
    assert h.get(timeout=30) == 0 and g.get(timeout=60) == 1
    a.stop()
    runs = {r.key: r for r in s.records.executions()}
    assert len(s.records.executions()) == 2, 'each ran once'
    assert runs['cont-run'].end is not None
    assert runs['cont-next'].token != old_token, 'it started under the lost session'
    assert runs['cont-next'].token > old_token
