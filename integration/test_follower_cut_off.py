"""The session heartbeat through a follower cut off from its leader.

The worker's session lives on a follower. The test cuts that follower off from the
other two nodes (its quorum connections go through proxies the test stalls), while
the worker still reaches the follower. For a moment the follower keeps answering
what it can answer alone (pings, reads); the leader, which alone expires sessions,
hears nothing more and expires the worker's session one timeout later. The step's
heartbeat is a ``sync``, which only the leader can answer, so the worker gives the
session up (and kills its holders) before the leader can expire it: another worker,
on the other nodes, takes the keys only once the holders are dead.
"""
import time

from integration import zkserver

import pytest

from .scenario import wait_for
from .tcpproxy import TcpProxy
from .faults import (  # noqa: F401  (fixtures)
    SESSION_GIVEN_UP, _started, assert_no_overlap_until_stopped, describe, log_lines,
    mutex_log, session_args, wait_completed, watch_factory)

pytestmark = pytest.mark.faults  # make faults (integration/conftest.py)


def _ensemble_with_a_proxied_follower(base):
    """Three nodes; node 1's view of nodes 2 and 3 goes through proxies. Node 1 has the
    lowest id, so it is a follower (the election prefers the highest id) and its
    connection to the leader is one it opens, through a proxy."""
    ports = zkserver.find_free_ports(9)
    real = [(i + 1, ports[3 + i], ports[6 + i]) for i in range(3)]
    proxies = []
    seen_by_1 = [real[0]]
    for sid, quorum, election in real[1:]:
        pq, pe = TcpProxy(('127.0.0.1', quorum)), TcpProxy(('127.0.0.1', election))
        proxies += [pq, pe]
        seen_by_1.append((sid, pq.port, pe.port))
    nodes = [zkserver.ZooKeeperNode(base / f'node{sid}', ports[sid - 1], server_id=sid,
                                    servers=seen_by_1 if sid == 1 else real)
             for sid, _, _ in real]
    return nodes, proxies


def test_a_follower_cut_off_from_its_leader_does_not_keep_the_session_alive(
        tmp_path, watch_factory, scenario):
    s = scenario
    nodes, proxies = _ensemble_with_a_proxied_follower(tmp_path)
    try:
        for n in nodes:
            n.start()
        wait_for(lambda: all(n.mode() for n in nodes) and 'leader' in
                 [n.mode() for n in nodes], timeout=60, message='the ensemble serving')
        follower, others = nodes[0], nodes[1:]
        assert follower.mode() == 'follower', [n.mode() for n in nodes]
        s.zk_hosts = ','.join(n.hosts for n in others)
        a = s.worker('a', concurrency=2, hosts=follower.hosts, extra_args=session_args())
        watch = watch_factory(s)
        keys = ['s0', 's1']
        longs = [s.send('work', k, 20.0, i) for i, k in enumerate(keys)]
        wait_for(lambda: len(_started(s, {h.id for h in longs})) == 2, message='holders on a')
        # b consumes a queue of its own: the keys' next tasks wait there for the keys
        b_queue = s.queue + '-b'
        s.extra_queues.append(b_queue)
        b = s.worker('b', concurrency=2, hosts=s.zk_hosts, extra_args=session_args(),
                     env={'TEST_QUEUE': b_queue})
        queued = [s.client.send_task(f'{s.app_module}.work', args=(k, 0.2, 10 + i),
                                     queue=b_queue) for i, k in enumerate(keys)]
        wait_for(lambda: all(f'[{h.id}] received' in b.log_text() for h in queued),
                 message='the next tasks waiting at b')

        t_cut = time.time()
        for p in proxies:
            p.stall()
        b_name = s.nodename(b)
        wait_for(lambda: {r.key for r in s.records.executions()
                          if r.worker == b_name and r.start > t_cut} == set(keys),
                 timeout=30, message='b taking both keys over')
        t_heal = time.time()
        for p in proxies:
            p.resume()

        runs = wait_completed(s, longs + queued, timeout=60, workers=[a, b])
        for h, k in zip(longs, keys):
            held = min((r for r in runs if r.id == h.id), key=lambda r: r.start)
            died = watch.died_at(held.pid, held.start)
            assert held.end is None and died is not None, describe(held, watch, t_cut)
            first_b = min(r.start for r in runs if r.key == k and r.worker == b_name)
            assert died <= first_b < t_heal, (describe(held, watch, t_cut), first_b - t_cut)
            print(f'{k}: a\'s holder died {died - t_cut:+.3f}s after the cut, b started it '
                  f'{first_b - t_cut:+.3f}s')
        assert log_lines(a, SESSION_GIVEN_UP), mutex_log([a])  # by its own deadline
        assert_no_overlap_until_stopped(s, watch, t0=t_cut)
    finally:
        for p in proxies:
            p.close()
        for n in nodes:
            n.close()
