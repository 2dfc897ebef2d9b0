"""What the fault tests share: overlap checks that count every execution interval,
waits, lease reports, broker-connection tools and the process-watch / proxy fixtures.

An execution without an end record (its process was killed) runs until its pool
process was seen dead (:class:`ProcessWatch`) or, if that was never seen, until the
end of the test. Used by test_faults.py, test_worker_faults.py, test_chaos.py,
test_exclusion.py, test_session_loss.py, test_follower_cut_off.py, test_policies.py.
"""
import subprocess
import time
from typing import Dict, Iterable, List, Optional

import psutil
import pytest
from kazoo.client import KazooClient

from .processwatch import ProcessWatch
from .records import Execution, by_key
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
