"""Session loss on real services: what happens to the holders' messages.

Shares the fault tests' helpers (integration/faults.py).
"""
import time

import pytest

from .scenario import wait_for
from .faults import (  # noqa: F401  (fixtures)
    HOLDER_KILLED, SESSION_TIMEOUT, _started, assert_results_succeeded, describe, log_lines,
    mutex_log, proxy_factory, session_args, wait_completed, watch_factory)

pytestmark = pytest.mark.faults  # make faults (integration/conftest.py)


# A pool process with this much touched memory takes the kernel 0.05-0.3 s to tear down.
HEAVY_MB = 3000


def test_holders_killed_for_a_lost_session_all_run_again(
        zk_factory, proxy_factory, watch_factory, scenario):
    """No task lost on session loss: the holders of a worker cut off from ZooKeeper,
    early-acked (republished) and acks_late (rejected back) alike, are killed and every
    one of them runs again from the start, on that same worker (the only one).

    One holder has a big heap, so its process takes the kernel a while to tear down.
    The deadline thread posts the session-loss bookkeeping only once every killed
    process is gone; the pool meanwhile reports the others' deaths (WorkerLostError) on
    the consumer thread. That report must not release their leases in a way that makes
    the bookkeeping skip them: their messages would never go back."""
    s = scenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    proxy = proxy_factory(node)
    a = s.worker('a', concurrency=5, hosts=proxy.hosts, extra_args=session_args())
    watch = watch_factory(s)
    duration = 3 * SESSION_TIMEOUT
    heavy = s.send('heavy', 'heavy', duration + 10, 4, HEAVY_MB)  # slow to start
    wait_for(lambda: _started(s, {heavy.id}), timeout=30, message='the heavy holder running')
    longs = [s.send('work', 'early0', duration, 0), s.send('work', 'early1', duration, 1),
             s.send('work_late', 'late0', duration, 2),
             s.send('work_late', 'late1', duration, 3)]
    ids = {h.id for h in longs + [heavy]}
    wait_for(lambda: len(_started(s, ids)) == 5, message='five holders running')
    first = _started(s, ids)

    t_stall = time.time()
    proxy.stall()
    wait_for(lambda: all(watch.died_at(r.pid, r.start) for r in first.values()),
             timeout=3 * SESSION_TIMEOUT, message='the holders killed')
    proxy.resume()
    deaths = {f"{r.task.rsplit('.', 1)[-1]}/{r.key}": watch.died_at(r.pid, r.start) - t_stall
              for r in first.values()}
    print('holders seen dead after the stall (s):',
          ', '.join(f'{k} {v:.3f}' for k, v in sorted(deaths.items())))

    handles = longs + [heavy]
    runs = wait_completed(s, handles, timeout=60, workers=[a])
    assert_results_succeeded(handles)
    assert log_lines(a, HOLDER_KILLED), mutex_log([a])
    for h in handles:
        mine = sorted((r for r in runs if r.id == h.id), key=lambda r: r.start)
        assert mine[0].end is None, f'{describe(mine[0])} was not killed'
        again = [r for r in mine[1:] if r.end is not None]
        assert again, f'{h.id} never ran again: lost'
        assert again[0].end - again[0].start >= duration - 0.05, 'ran from the start'
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
