"""Faults on real services: ZooKeeper crashes, outages and lost quorum, killed, frozen
and partitioned workers, broker connection resets.

Every test counts every execution interval: an execution without an end record (its
process was killed) runs until its pool process was seen dead (:class:`ProcessWatch`)
or, if that was never seen, until the end of the test. Unless said otherwise a test
asserts no overlap per key and no lost task (every task has a completed execution).

The helpers here are shared with test_chaos.py.
"""
import os
import re
import signal
import subprocess
import time
from typing import Dict, Iterable, List, Optional

import psutil
import pytest
from kazoo.client import KazooClient

from .processwatch import ProcessWatch
from .records import Execution, by_key
from .scenario import wait_for
from .tcpproxy import TcpProxy

SESSION_TIMEOUT = 4  # seconds (ZooKeeper nodes tick every 500 ms: 4 s is allowed)
TICK = 0.5
BROKER_PORT = 5672

# What the product logs (ERROR) when it gives a session up / kills a holder for it.
SESSION_GIVEN_UP = 'treating the session as lost'
HOLDER_KILLED = 'its lease was lost with the ZooKeeper session: killing it'


def session_args(timeout=SESSION_TIMEOUT):
    return ['--mutex-session-timeout', str(timeout)]


# --------------------------------------------------------------------------- processes

# ProcessWatch: integration/processwatch.py (pid + start time, so pid reuse is seen).


# --------------------------------------------------------------------------- executions

def span_end(ex: Execution, watch: Optional[ProcessWatch], test_end: float) -> float:
    """When an execution stopped running, as far as anyone can tell."""
    if ex.end is not None:
        return ex.end
    died = watch.died_at(ex.pid, ex.start) if watch is not None else None
    return died if died is not None else test_end


def by_mutex(runs: Iterable[Execution]) -> Dict[tuple, List[Execution]]:
    """Executions per lock: (mutex name, key). The test tasks use their own name as
    the mutex name, so work('k') and work_late('k') are two different locks."""
    out: Dict[tuple, List[Execution]] = {}
    for key, key_runs in by_key(list(runs)).items():
        if key is None:
            continue
        for ex in key_runs:  # by_key sorted them by start
            out.setdefault((ex.task, key), []).append(ex)
    return out


def overlapping(runs: Iterable[Execution], watch: Optional[ProcessWatch],
                test_end: float) -> List[tuple]:
    """Pairs of executions of one lock whose intervals intersect (killed ones included)."""
    found = []
    for key, key_runs in by_mutex(runs).items():
        for i, a in enumerate(key_runs):
            a_end = span_end(a, watch, test_end)
            for b in key_runs[i + 1:]:
                if b.start >= a_end:
                    break
                found.append((key, a, b))
    return found


def describe(ex: Execution, watch: Optional[ProcessWatch] = None, t0: float = 0.0) -> str:
    if ex.end is not None:
        end = f'{ex.end - t0:.3f}'
    else:
        died = watch.died_at(ex.pid, ex.start) if watch is not None else None
        end = f'(no end; pid died {died - t0:.3f})' if died is not None else '(no end; pid alive)'
    return (f'{ex.task.rsplit(".", 1)[-1]}[{ex.id[:8]}] key={ex.key} on {ex.worker} '
            f'pid {ex.pid} token {ex.token} {ex.start - t0:.3f}..{end}')


def assert_no_overlap(runs, watch, test_end, t0=0.0):
    found = overlapping(runs, watch, test_end)
    assert found == [], 'executions of one key overlapped:\n' + '\n'.join(
        f'  {describe(a, watch, t0)}\n  {describe(b, watch, t0)}\n' for _, a, b in found[:10])


def assert_no_overlap_until_stopped(s, watch, t0=0.0):
    """Stop every worker of the scenario, then check every execution recorded: a
    duplicate that started after ``wait_completed`` returned (which it does the moment
    every task has an end record) is counted too."""
    for w in s.workers:
        w.terminate()
    for w in s.workers:
        w.stop(timeout=30)
    watch.stop()  # a last look: every process of theirs is gone now
    runs = s.records.executions()
    assert_no_overlap(runs, watch, time.time(), t0)
    return runs


def wait_completed(s, handles, timeout=60.0, workers=()):
    """Wait until every task has a completed execution (an end record); return the
    executions. Fails naming the missing tasks and the lease nodes left."""
    ids = {h.id for h in handles}
    deadline = time.monotonic() + timeout
    while True:
        runs = s.records.executions()
        done = {r.id for r in runs if r.end is not None}
        missing = ids - done
        if not missing:
            return runs
        if time.monotonic() >= deadline:
            raise AssertionError(
                f'{len(missing)} of {len(ids)} tasks never completed (lost or stuck) after '
                f'{timeout:.0f}s: {sorted(missing)[:10]}\n{lease_report(s, workers)}\n'
                + mutex_log(workers))
        time.sleep(0.1)


def lease_report(s, workers=()):
    """Diagnostics: the lease nodes left (holder, session, zxid) and each worker's view."""
    out = []
    try:
        client = observer(s.zk_hosts)
        try:
            for name in (client.get_children(s.namespace) if client.exists(s.namespace)
                         else []):
                data, stat = client.get(f'{s.namespace}/{name}')
                out.append(f'lease {name[:12]} owner {stat.ephemeralOwner:#x} czxid '
                           f'{stat.czxid:#x}: {data.decode("utf-8", "replace")}')
        finally:
            client.stop()
            client.close()
    except Exception as exc:
        out.append(f'(could not list the lease nodes: {exc!r})')
    for w in workers:
        try:
            replies = s.client.control.inspect([s.nodename(w)], timeout=3)._request(
                'mutex_leases') or {}
            info = list(replies.values())[0] if replies else None
        except Exception as exc:
            info = repr(exc)
        if isinstance(info, dict):
            info = dict(info, waiting=len(info.get('waiting') or ()))
            if isinstance(info.get('session_id'), int):
                info['session_id'] = hex(info['session_id'])
        out.append(f'{w.hostname}: {info}')
    return '\n'.join(out)


def assert_results_succeeded(handles, timeout=30.0):
    """The result of each task ends SUCCESS (a killed first run's state is overwritten)."""
    deadline = time.monotonic() + timeout
    pending = list(handles)
    while pending and time.monotonic() < deadline:
        pending = [h for h in pending if h.state != 'SUCCESS']
        if pending:
            time.sleep(0.1)
    assert not pending, 'results not SUCCESS: %s' % [(h.id, h.state) for h in pending[:10]]


def mutex_log(workers, lines=40):
    out = []
    for w in workers:
        picked = [x for x in w.log_text().splitlines()
                  if 'mutex' in x or 'ZooKeeper' in x or 'broker' in x.lower()]
        out.append(f'--- {w.hostname} (pid {w.pid}):\n' + '\n'.join(picked[-lines:]))
    return '\n'.join(out)


def log_lines(worker, text, level='ERROR'):
    return [x for x in worker.log_text().splitlines() if text in x and level in x]


# --------------------------------------------------------------------------- ZooKeeper

def observer(hosts):
    """A fresh kazoo client (the scenario's may have lost its session in a fault)."""
    client = KazooClient(hosts=hosts, timeout=10)
    client.start(timeout=20)
    return client


def lease_stats(hosts, paths):
    client = observer(hosts)
    try:
        return {p: client.exists(p) for p in paths}
    finally:
        client.stop()
        client.close()


# --------------------------------------------------------------------------- broker

def amqp_local_ports(pid: int, broker_port: int = BROKER_PORT) -> List[int]:
    """Local ports of the established TCP connections of ``pid`` to the broker."""
    try:
        conns = psutil.Process(pid).net_connections(kind='tcp')
    except psutil.NoSuchProcess:
        return []
    return [c.laddr.port for c in conns
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == broker_port]


def close_broker_connections(worker) -> int:
    """Close, on the RabbitMQ side, every AMQP connection of the worker's main
    process (found by the client port); return how many were closed."""
    ports = set(amqp_local_ports(worker.pid))
    if not ports:
        return 0
    out = subprocess.run(['rabbitmqctl', '-q', 'list_connections', 'pid', 'peer_port'],
                         capture_output=True, text=True, timeout=60)
    closing = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) in ports:
            closing.append(subprocess.Popen(
                ['rabbitmqctl', '-q', 'close_connection', fields[0],
                 'test: broker connection reset'],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return sum(1 for proc in closing if proc.wait(60) == 0)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def proxy_factory():
    """``proxy_factory(node)``: a TcpProxy to a ZooKeeper node, closed at teardown."""
    made = []

    def make(node):
        proxy = TcpProxy(('127.0.0.1', node.client_port))
        made.append(proxy)
        return proxy
    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def watch_factory():
    made = []

    def make(s):
        w = ProcessWatch(lambda: s.workers).start()
        made.append(w)
        return w
    yield make
    for w in made:
        w.stop()


def _started(s, ids):
    return {r.id: r for r in s.records.executions() if r.id in ids}


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
