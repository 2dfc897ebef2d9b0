"""No hoarding: a worker takes a lease only for a request one of its pool
processes is about to run (by default one lease ahead per process), so a busy
worker never sits on a key that a worker with an idle process could use."""
import pytest

from .records import overlaps
from .scenario import wait_for


def mutex_info(s, worker):
    replies = s.client.control.inspect([s.nodename(worker)], timeout=3)._request('mutex_leases') or {}
    return list(replies.values())[0]


@pytest.mark.parametrize('ahead', [None, 0], ids=['one-ahead-per-process', 'lease-ahead-0'])
def test_a_busy_worker_does_not_take_the_lease_of_a_request_it_cannot_run_yet(scenario, ahead):
    s = scenario
    env = {} if ahead is None else {'TEST_LEASE_AHEAD': str(ahead)}
    other_queue = f'{s.queue}-idle'
    busy = s.worker('busy', concurrency=1, env=env)
    s.worker('idle', concurrency=1, extra_args=['-Q', other_queue], env=env)
    # The busy worker's one process runs a long task; by default one more request
    # (the next it will run) may be leased, so it gets an unguarded one first.
    before = [s.send('plain', 1, 4.0)] + ([s.send('plain', 2, 0.1)] if ahead is None else [])
    wait_for(lambda: s.records.count('start') == 1, message='the busy worker runs its long task')
    first = s.send('work', 'k', 0.2, 1)
    wait_for(lambda: f'[{first.id}] received' in busy.log_text(), message='prefetched')
    wait_for(lambda: mutex_info(s, busy).get('waiting_for_a_process') == 1,
             message='the request waits for a process, not for its lease')
    assert s.lease_nodes() == [], 'the busy worker took a lease it cannot use yet'

    second = s.client.send_task(f'{s.app_module}.work', args=('k', 0.2, 2), queue=other_queue)
    assert second.get(timeout=30) == 2
    assert first.get(timeout=30) == 1
    assert [h.get(timeout=30) for h in before] == [1, 2][:len(before)]
    runs = s.records.executions()
    long_run = [r for r in runs if r.task.endswith('.plain') and r.extra.get('n') == 1][0]
    key_runs = {r.extra.get('seq'): r for r in runs if r.key == 'k'}
    assert sorted(key_runs) == [1, 2]
    # The idle worker ran the key while the busy one was still on its long task.
    assert key_runs[2].worker != key_runs[1].worker
    assert key_runs[2].end < long_run.end, 'the idle worker waited for the busy one'
    assert key_runs[1].start >= long_run.end  # -c 1: after the long task
    assert overlaps(list(key_runs.values())) == []
