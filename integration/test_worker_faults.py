"""Worker and broker faults on real services: a worker SIGKILLed while it holds leases,
broker connections reset while requests are granted, in the pool or not yet started.

Unless said otherwise a test asserts no overlap per key (every execution interval counts,
integration/faults.py) and no lost task (every task has a completed execution).
"""
import os
import re
import signal
import time

import pytest

from .scenario import wait_for
from .faults import (  # noqa: F401  (fixtures)
    SESSION_TIMEOUT, session_args, describe, assert_no_overlap,
    assert_no_overlap_until_stopped, wait_completed, assert_results_succeeded,
    close_broker_connections, watch_factory, _started)

pytestmark = pytest.mark.faults  # make faults (integration/conftest.py)


# =========================================================================== 4

def test_killed_worker_leases_vanish_with_its_session_and_its_tasks_run_elsewhere(
        watch_factory, scenario):
    s = scenario
    a = s.worker('a', concurrency=3, extra_args=session_args())
    watch = watch_factory(s)
    keys = ['k0', 'k1', 'k2']
    longs = [s.send('work_late', k, 6.0, i) for i, k in enumerate(keys)]
    wait_for(lambda: len(_started(s, {h.id for h in longs})) == 3, message='holders on a')
    b = s.worker('b', concurrency=3, extra_args=session_args())
    queued = [s.send('work_late', k, 0.2, 10 + i) for i, k in enumerate(keys * 2)]
    paths = [s.lease_path('work_late', k) for k in keys]
    wait_for(lambda: all(s.zk.exists(p) for p in paths), message='leases held')
    owner = {s.zk.exists(p).ephemeralOwner for p in paths}
    assert len(owner) == 1
    time.sleep(0.5)

    t_kill = time.time()
    a.kill()
    gone = {}     # first seen gone (an upper bound of when it vanished)
    present = {}  # last asked while it was still there (a lower bound)
    deadline = time.monotonic() + SESSION_TIMEOUT + 10
    while len(gone) < len(paths) and time.monotonic() < deadline:
        for p in paths:
            if p not in gone:
                asked = time.time()
                stat = s.zk.exists(p)
                if stat is None or stat.ephemeralOwner not in owner:
                    gone[p] = time.time()
                else:
                    present[p] = asked
        time.sleep(0.01)
    assert len(gone) == len(paths), 'the dead worker\'s leases never vanished'
    latest = max(gone.values()) - t_kill
    # How soon is the machine's business (a loaded server expires late): the
    # guarantee is that they vanish without a TTL, and the order below.
    print(f'leases vanished {min(gone.values()) - t_kill:.3f}..{latest:.3f}s after the kill '
          f'(session timeout {SESSION_TIMEOUT}s)')

    runs = wait_completed(s, longs + queued, timeout=45, workers=[a, b])
    test_end = time.time()
    assert_results_succeeded(longs + queued)
    assert_no_overlap(runs, watch, test_end, t0=t_kill)
    a_name, b_name = s.nodename(a), s.nodename(b)
    for h, p in zip(longs, paths):
        mine = sorted((r for r in runs if r.id == h.id), key=lambda r: r.start)
        assert mine[0].worker == a_name and mine[0].end is None
        died = watch.died_at(mine[0].pid, mine[0].start)
        assert died is not None and died >= t_kill, describe(mine[0], watch, t_kill)
        again = [r for r in mine[1:] if r.end is not None]
        assert again and again[0].worker == b_name, [describe(r, watch, t_kill) for r in mine]
        # The poll sees the node gone a moment after it vanished: compare with the
        # last moment it was certainly still there.
        assert again[0].start >= present.get(p, t_kill), (
            'ran again only once the old lease was gone')
        assert again[0].start >= died, 'ran again only once the old holder was dead'
    assert not [r for r in runs if r.worker == a_name and r.start > t_kill]
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 5

def test_broker_connection_reset_releases_the_leases_of_dropped_requests(
        watch_factory, scenario):
    """Closing a worker's broker connections drops the requests it had granted but not
    yet started (they wait for a pool process): their leases must be released, or
    their keys stay held by a live session forever."""
    s = scenario
    w = s.worker('w', concurrency=2, extra_args=session_args())
    watch = watch_factory(s)
    blockers = [s.send('work', 'b0', 4.0, 0), s.send('work_late', 'b1', 4.0, 1)]
    wait_for(lambda: len(_started(s, {h.id for h in blockers})) == 2,
             message='both pool processes busy')
    # One lease ahead per process (no hoarding): two requests get theirs and wait for a
    # process in the pool's buffer; the next two wait in the consumer without a lease.
    granted = [s.send('work', f'c{i}', 0.2, 10 + i) for i in range(2)]
    unleased = [s.send('work', f'c{i}', 0.2, 10 + i) for i in range(2, 4)]
    contended = [s.send('work', 'b0', 0.2, 20), s.send('work_late', 'b1', 0.2, 21)]
    granted_paths = [s.lease_path('work', f'c{i}') for i in range(2)]
    wait_for(lambda: all(s.zk.exists(p) for p in granted_paths), timeout=10,
             message='leases granted to requests waiting for a pool process')
    assert not _started(s, {h.id for h in granted + unleased}), 'precondition: not started yet'
    assert not any(s.zk.exists(s.lease_path('work', f'c{i}')) for i in range(2, 4))
    time.sleep(0.3)

    t_reset = time.time()
    assert close_broker_connections(w) >= 1
    wait_for(lambda: re.search(r'[Cc]onnection to broker lost', w.log_text()),
             timeout=10, message='the consumer noticed')

    handles = blockers + granted + unleased + contended
    runs = wait_completed(s, handles, timeout=40, workers=[w])
    test_end = time.time()
    assert_results_succeeded(handles)
    assert_no_overlap(runs, watch, test_end, t0=t_reset)
    for h in granted + unleased:
        assert len([r for r in runs if r.id == h.id]) == 1, 'ran once, after the reset'
    wait_for(lambda: s.lease_nodes() == [], timeout=10,
             message='no lease left once every task completed')
    assert_no_overlap_until_stopped(s, watch)


# =========================================================================== 5b

def test_broker_reset_while_a_pool_process_has_the_request_but_not_yet_started_it(
        watch_factory, scenario):
    """On a broker reconnect prefork forgets the requests its processes have not
    acknowledged yet (pool.flush discards them), but a request already written to a
    process still runs there once that process reads it. Here the process is slow to
    read it (SIGSTOPped while it is handed the request, SIGCONT 3.5 s after the reset):
    the request's lease must not be freed while it can still run."""
    s = scenario
    w = s.worker('w', concurrency=1, extra_args=session_args(), env={'TEST_PREFETCH': '1'})
    watch = watch_factory(s)
    child = wait_for(lambda: w.child_pids(), message='the pool process')[0]
    os.kill(child, signal.SIGSTOP)
    try:
        t = s.send('fenced_patient', 'u0', 3.0, 0)
        path = s.lease_path('fenced_patient', 'u0')
        wait_for(lambda: s.zk.exists(path), message='lease granted, request handed to the pool')
        time.sleep(0.5)
        assert not _started(s, {t.id}), 'precondition: the pool process has not started it'
        b = s.worker('b', concurrency=3, extra_args=session_args())
        # waiters for the key, some of them at b (which waits with a watch)
        waiters = [s.send('fenced_patient', 'u0', 3.0, 10 + i) for i in range(4)]
        time.sleep(1.0)
        t_reset = time.time()
        assert close_broker_connections(w) >= 1
        # long enough for the step to give up on the request (it waits 2 s), short
        # enough that b still runs what it took then
        time.sleep(3.5)
    finally:
        try:
            os.kill(child, signal.SIGCONT)
        except ProcessLookupError:  # the worker killed it to free the lease: fine
            pass
    t_cont = time.time()
    handles = [t] + waiters
    runs = wait_completed(s, handles, timeout=60, workers=[w, b])
    test_end = time.time()
    assert_results_succeeded(handles)
    for r in sorted(runs, key=lambda r: r.start):
        print(describe(r, watch, t_reset))
    print(f'SIGCONT at {t_cont - t_reset:.3f}s')
    assert_no_overlap(runs, watch, test_end, t0=t_reset)
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, watch)
