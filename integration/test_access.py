"""Access control and fail-closed: ACLs on every node, credentials checked once at
start, namespaces isolate, and a guarded task never runs without its lease."""
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from .records import overlaps
from .scenario import wait_for

SECRET = 'mutex:s3cret-pw'


def test_a_foreign_client_can_neither_read_nor_delete_a_lease(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2, env={'TEST_AUTH': SECRET}, loglevel='DEBUG')
    h = s.send('work', 'acl', 3.0, 1)
    path = s.lease_path('work', 'acl')
    wait_for(lambda: s.zk.exists(path), message='lease node')
    foreign = s.zk  # no credentials
    with pytest.raises(NoAuthError):
        foreign.get(path)
    with pytest.raises(NoAuthError):
        foreign.delete(path)
    with pytest.raises(NoAuthError):
        foreign.get_children(s.namespace)
    owner = KazooClient(hosts=s.zk_hosts, auth_data=[('digest', SECRET)])
    owner.start(timeout=15)
    try:
        data, _ = owner.get(path)
        assert b'"task_id"' in data
    finally:
        owner.stop()
        owner.close()
    assert h.get(timeout=20) == 1
    assert 's3cret-pw' not in w.log_text(), 'the password was logged'


def test_wrong_credentials_are_reported_once_and_nothing_runs_or_is_lost(scenario):
    s = scenario
    good = s.worker('good', concurrency=2, env={'TEST_AUTH': SECRET})
    s.send('work', 'cred', 0, 0).get(timeout=20)  # creates the protected namespace
    good.stop()
    bad = s.worker('bad', concurrency=2, env={'TEST_AUTH': 'mutex:not-the-pw-9f3'})
    guarded = [s.send('work', 'cred', 0, i) for i in range(1, 4)]
    assert s.send('plain', 7).get(timeout=20) == 7, 'plain tasks run'
    wait_for(lambda: 'may not create leases' in bad.log_text(), message='the ERROR')
    # A repeat would come with the 10 s "not reachable" cadence: wait past it
    # while the guarded tasks keep coming back (every 0.2 s).
    time.sleep(10.5)
    lines = [x for x in bad.log_text().splitlines() if 'may not create leases' in x]
    assert len(lines) == 1 and 'ERROR' in lines[0] and s.namespace in lines[0]
    assert 'not-the-pw-9f3' not in bad.log_text()
    assert [r for r in s.records.executions() if r.key == 'cred' and r.extra['seq'] > 0] == []
    bad.stop()
    s.worker('good2', concurrency=2, env={'TEST_AUTH': SECRET})
    assert sorted(h.get(timeout=30) for h in guarded) == [1, 2, 3], 'nothing lost'


def test_two_namespaces_never_contend(scenario):
    s = scenario
    # acks_late and prefetch 1: worker a holds one message, so b gets the next.
    s.worker('a', concurrency=1, env={'TEST_PREFETCH': '1'})
    # The first holds long enough for b to start on a loaded machine; the
    # check below fails (not passes) if it still ended before b's task began.
    first = s.send('work_late', 'shared', 12.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='first holder')
    s.worker('b', concurrency=1, env={'TEST_PREFETCH': '1',
                                      'TEST_NAMESPACE': s.namespace + '-other'})
    second = s.send('work_late', 'shared', 0.5, 1)
    assert second.get(timeout=20) == 1
    assert s.records.count('end') == 1, 'the second ran while the first still held its key'
    assert first.get(timeout=20) == 0
    runs = s.records.executions()
    assert len(runs) == 2 and runs[0].worker != runs[1].worker
    assert overlaps(runs), 'each namespace granted its own lease at the same time'


@pytest.mark.parametrize('task', ['work', 'work_late'])
def test_a_guarded_task_without_its_lease_refuses_to_run(scenario, task):
    s = scenario
    off = s.worker('off', concurrency=2, extra_args=['--without-mutex'])
    h = s.send(task, 'fc', 0, 1)
    wait_for(lambda: 'reached the pool without its lease' in off.log_text(),
             message='the refusal')
    line = [x for x in off.log_text().splitlines() if 'without its lease' in x][0]
    assert 'ERROR' in line and h.id in line
    time.sleep(1.5)
    assert s.records.count('start') == 0, 'it never ran without a lease'
    off.stop()
    s.worker('on', concurrency=2)
    assert h.get(timeout=30) == 1, 'it went back to the broker and ran with a lease'
    runs = s.records.executions()
    assert len(runs) == 1 and runs[0].token is not None


@pytest.mark.parametrize('task', ['work', 'work_late'])
@pytest.mark.parametrize('app_module, env', [
    ('integration.testapp', {'TEST_INSTALL': '0'}),  # imports the package, no install()
    ('integration.uninstalledapp', {}),              # never imports it at all
], ids=['install-never-called', 'package-never-imported'])
def test_a_worker_without_the_step_at_all_runs_no_guarded_task(scenario, app_module, env,
                                                               task):
    s = scenario
    bare = s.worker_factory(app_module, hostname=f'bare-{s.queue}@%h', concurrency=2,
                            extra_args=[], env=s.env(**env))
    h = s.send(task, 'fc', 0, 1)

    def refusals():
        return [x for x in bare.log_text().splitlines()
                if 'reached the pool without its lease' in x and h.id in x]
    # Refused twice: it went back to the broker and came back, and never ran.
    wait_for(lambda: s.records.count('start') or len(refusals()) >= 2, timeout=30,
             message='two refusals')
    assert s.records.count('start') == 0, 'it ran without a lease'
    assert all('ERROR' in x for x in refusals())
    bare.stop()
    on = s.worker('on', concurrency=2)
    assert h.get(timeout=30) == 1, 'nothing lost: it ran with a lease once a step was there'
    runs = s.records.executions()
    assert len(runs) == 1 and runs[0].token is not None and runs[0].worker == s.nodename(on)
