"""``celery mutex list | release | status`` against real ZooKeeper, RabbitMQ and workers.

The command runs as an operator runs it, in its own process
(``python -m celery -A integration.testapp mutex ...``), with the scenario's
environment and ``--mutex-hosts`` pointing at the test ZooKeeper. Other
workers may share the broker (other tests, other people): assertions only
look at this scenario's namespace and worker.
"""
import json
import os
import pty
import socket
import subprocess
import sys
import time
import uuid

from kazoo.client import KazooClient
from kazoo.security import make_digest_acl


from .procs import running
from .scenario import APP, wait_for
from .workers import REPO_ROOT, worker_env

CLI_TIMEOUT = 60
# A Redis database no worker listens on: a broadcast there gets no answer.
SILENT_BROKER = 'redis://127.0.0.1:6379/9'
# Nothing listens on port 1: the broker cannot be reached at all.
DOWN_BROKER = 'redis://127.0.0.1:1/0'
# The exit statuses every sub-command shares (README, "celery mutex").
OK, PROBLEM, USAGE, UNAVAILABLE = 0, 1, 2, 69


def mutex_cli(s, *args, hosts=None, env=None, timeout=CLI_TIMEOUT, start=False,
              stdin=subprocess.DEVNULL):
    """Run ``celery mutex ARGS`` for scenario ``s``, by default with no stdin (as in CI)."""
    cmd = [sys.executable, '-m', 'celery', '-A', APP, 'mutex', *args]
    if hosts is not False:
        cmd += ['--mutex-hosts', hosts or s.zk_hosts]
    proc = subprocess.Popen(cmd, env=worker_env(s.env(**(env or {}))), cwd=REPO_ROOT,
                            stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if start:
        return proc
    return finish(proc, timeout)


def finish(proc, timeout=CLI_TIMEOUT):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f'celery mutex hung:\n{out}\n{err}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_json_line(result):
    """``-j`` prints one line of JSON, as ``celery inspect -j`` does."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    return json.loads(lines[0])


def listed(s, *args, **kw):
    result = mutex_cli(s, 'list', '-j', *args, **kw)
    assert result.returncode in (OK, PROBLEM), result.stderr
    data = one_json_line(result)
    return {lease['path']: lease for lease in data['leases']}, data


def row_of(output, path):
    """The table row of the lease at ``path`` (rows start with its short key)."""
    short = path.rsplit('/', 1)[1][:12]
    rows = [line for line in output.splitlines() if line.startswith(short)]
    assert len(rows) == 1, output
    return rows[0]


def answered_on_a_terminal(s, keys, *args):
    """Run the command with a pseudo-terminal as stdin on which ``keys`` were typed."""
    master, slave = pty.openpty()
    try:
        os.write(master, keys)
        return mutex_cli(s, *args, stdin=slave)
    finally:
        os.close(slave)
        os.close(master)


def fake_lease(s, key, *, worker, pid, age=5.0, timeout=3600, client=None):
    """An ephemeral lease node of our own session with the data a worker writes."""
    data = {
        'v': 1, 'mutex': f'{APP}.work', 'task': f'{APP}.work', 'task_id': str(uuid.uuid4()),
        'host': socket.gethostname(), 'pid': pid, 'worker': worker,
        'acquired_at': round(time.time() - age, 3), 'timeout': timeout,
        'keys': ['key'], 'values': [key],
    }
    path = s.lease_path('work', key)
    (client or s.zk).create(path, json.dumps(data).encode(), ephemeral=True, makepath=True)
    return path, data


def test_list_shows_the_holder_and_release_kills_it(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2)
    worker = s.nodename(w)
    h = s.send('work', 'held', 60, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder running')
    run = s.records.executions()[0]
    path = s.lease_path('work', 'held')
    _, stat = s.zk.get(path)

    table = mutex_cli(s, 'list')
    assert table.returncode == OK, table.stderr
    row = row_of(table.stdout, path)
    for part in ('held', f'{APP}.work', 'key=held', worker, f'pid {w.pid}', h.id,
                 str(stat.czxid)):
        assert part in row, (part, table.stdout)

    leases, data = listed(s)
    lease = leases[path]
    assert data['namespace'] == s.namespace and data['stale'] == 0
    assert worker in data['workers']['answered']
    assert lease['status'] == 'held' and lease['claimed_by'] == worker
    assert (lease['worker'], lease['pid'], lease['task_id']) == (worker, w.pid, h.id)
    assert lease['key_values'] == {'key': 'held'}
    assert (lease['token'], lease['session_id']) == (stat.czxid, stat.ephemeralOwner)
    assert 0 <= lease['age'] < 60 and lease['timeout'] == 3600

    # -d asks only the workers named: the holder, or another (then nobody could claim it).
    leases, data = listed(s, '-d', f'{worker},nobody@nowhere')
    assert leases[path]['status'] == 'held' and data['workers']['asked'] == [
        worker, 'nobody@nowhere']
    leases, data = listed(s, '--destination', 'nobody@nowhere', '--timeout', '0.5')
    assert leases[path]['status'] == 'unclaimed?' and 'was not asked' in leases[path]['reason']
    assert data['workers']['answered'] == []
    asked_another = mutex_cli(s, 'release', '--yes', '-d', 'nobody@nowhere', path)
    assert asked_another.returncode == PROBLEM, asked_another.stderr
    assert f'no live worker claims {path}' in asked_another.stderr
    assert s.zk.exists(path) and running(run.pid)

    # No terminal to confirm on: refuse at once, touch nothing.
    started = time.monotonic()
    asked = mutex_cli(s, 'release', path)
    assert asked.returncode == USAGE and time.monotonic() - started < 30
    assert 'stdin is not a terminal' in asked.stderr and '--yes' in asked.stderr
    # On a terminal it asks; "n" keeps the lease.
    answer = answered_on_a_terminal(s, b'n\n', 'release', path)
    assert answer.returncode == PROBLEM and 'Proceed?' in answer.stderr
    assert 'Aborted' in answer.stderr
    # --delete-stale on a lease a live worker holds: refused, release it normally.
    forced = mutex_cli(s, 'release', '--delete-stale', '--yes', path)
    assert forced.returncode == PROBLEM
    assert 'held by the live worker' in forced.stderr
    assert 'without --delete-stale' in forced.stderr
    assert s.zk.exists(path) and running(run.pid)

    released = mutex_cli(s, 'release', path.rsplit('/', 1)[1][:12], '--yes', '-t', '5')
    assert released.returncode == OK, released.stdout + released.stderr
    assert f'released {path}' in released.stdout and f'killed {APP}.work[{h.id}]' in released.stdout
    assert not s.zk.exists(path)
    assert not running(run.pid), 'the lease was freed while its task could run'
    wait_for(lambda: h.state == 'REVOKED', timeout=15, message='REVOKED state')
    assert s.records.executions()[0].end is None, 'the killed task finished'
    # The key is free: the next task on it runs, with a newer token.
    assert s.send('work', 'held', 0, 1).get(timeout=20) == 1
    runs = [r for r in s.records.executions() if r.key == 'held']
    assert [r.extra['seq'] for r in runs] == [0, 1] and runs[1].token > runs[0].token
    assert runs[0].end is None


def test_stale_lease_is_flagged_and_only_it_is_deleted(scenario):
    s = scenario
    w = s.worker('w1', concurrency=1)
    worker = s.nodename(w)
    # Leases left by an earlier session of this worker: it answers without them.
    stale, _ = fake_lease(s, 'stale', worker=worker, pid=w.pid)
    older, _ = fake_lease(s, 'older', worker=worker, pid=w.pid)
    # A lease whose worker does not answer: its session is alive, nobody can tell.
    ghost, _ = fake_lease(s, 'ghost', worker='ghost@nowhere', pid=1)

    table = mutex_cli(s, 'list')
    assert table.returncode == PROBLEM, table.stderr  # some lease is STALE
    assert ' STALE ' in row_of(table.stdout, stale)
    assert ' unclaimed? ' in row_of(table.stdout, ghost)
    assert 'no live worker claims it' in table.stdout
    leases, data = listed(s)
    assert data['stale'] == 2
    assert leases[stale]['status'] == 'STALE' and leases[stale]['claimed_by'] is None
    assert leases[ghost]['status'] == 'unclaimed?'

    # The stale lease really blocks its key ...
    h = s.send('work', 'stale', 0, 7)
    time.sleep(1.0)
    assert s.records.count('start') == 0
    refused = mutex_cli(s, 'release', '--delete-stale', '--yes', ghost)
    assert refused.returncode == PROBLEM and 'unclaimed?' in refused.stderr
    normal = mutex_cli(s, 'release', '--yes', stale)
    assert normal.returncode == PROBLEM and 'delete it with --delete-stale' in normal.stderr
    # ... until --delete-stale deletes it; the ghost stays.
    deleted = mutex_cli(s, 'release', '--delete-stale', '--yes', '-j', stale)
    assert deleted.returncode == OK, deleted.stderr
    assert one_json_line(deleted)['results'][0]['deleted'] is True
    assert not s.zk.exists(stale) and s.zk.exists(ghost)
    assert h.get(timeout=20) == 7
    # --force still means --delete-stale, with a warning (in `celery purge` it means
    # "do not ask").
    old = mutex_cli(s, 'release', '--force', '--yes', older)
    assert old.returncode == OK, old.stderr
    assert '--force is deprecated' in old.stderr and f'deleted {older}' in old.stdout
    assert not s.zk.exists(older) and s.zk.exists(ghost)
    assert '--force' not in mutex_cli(s, 'release', '--help').stdout

    status = mutex_cli(s, 'status', '-j', '-d', worker)
    assert status.returncode == OK, status.stderr
    view = one_json_line(status)
    (server,) = view['zookeeper']['servers']
    assert server['reachable'] and server['mode'] == 'standalone' and server['zxid'] > 0
    assert view['namespace']['namespace'] == s.namespace
    assert view['namespace']['lease_count'] == 1  # the ghost
    mine = {row['worker']: row for row in view['workers']}[worker]
    assert mine['state'] == 'connected' and mine['leases'] == 0
    assert mine['counters']['acquired'] >= 1
    text = mutex_cli(s, 'status', '--destination', f'{worker},nobody@nowhere')
    assert text.returncode == OK, text.stderr
    assert 'not answering: nobody@nowhere' in text.stdout
    assert 'standalone' in text.stdout
    line = [x for x in text.stdout.splitlines() if x.strip().startswith(worker)]
    assert line and 'connected' in line[0] and f'0x{mine["session_id"]:x}' in line[0]


def test_no_worker_answering_is_not_staleness(scenario):
    s = scenario
    silent = {'TEST_BROKER': SILENT_BROKER}
    quiet, _ = fake_lease(s, 'quiet', worker='w9@elsewhere', pid=1)
    overdue, _ = fake_lease(s, 'overdue', worker='w9@elsewhere', pid=1, age=100, timeout=10)

    table = mutex_cli(s, 'list', env=silent)
    assert 'none answered' in table.stdout, table.stdout + table.stderr
    assert ' unclaimed? ' in row_of(table.stdout, quiet)
    assert ' STALE ' in row_of(table.stdout, overdue) and 'past its timeout' in table.stdout
    refused = mutex_cli(s, 'release', '--delete-stale', '--yes', quiet, env=silent)
    assert refused.returncode == PROBLEM and 'no worker answered' in refused.stderr
    assert s.zk.exists(quiet)


def test_errors_name_the_problem(scenario, zk):
    s = scenario
    locked = f'{s.namespace}-locked'
    owner = KazooClient(hosts=zk.hosts, auth_data=[('digest', 'ops:secret')])
    owner.start(timeout=15)
    try:
        owner.create(locked, b'', acl=[make_digest_acl('ops', 'secret', all=True)])
        runs = {
            'bad': mutex_cli(s, 'list', hosts='127.0.0.1:21x81', start=True),
            'down': mutex_cli(s, 'list', '--zk-timeout', '2', hosts='127.0.0.1:1,127.0.0.1:2',
                              start=True),
            'noauth': mutex_cli(s, 'list', '--namespace', locked, start=True),
            'authed': mutex_cli(s, 'list', '--namespace', locked, '--mutex-auth', 'ops:secret',
                                start=True),
        }
        done = {name: finish(proc) for name, proc in runs.items()}
    finally:
        owner.delete(locked)
        owner.stop()
        owner.close()
    bad, down, noauth = done['bad'], done['down'], done['noauth']
    assert bad.returncode == USAGE and "--mutex-hosts: bad port '21x81'" in bad.stderr
    assert down.returncode == UNAVAILABLE and '127.0.0.1:1,127.0.0.1:2' in down.stderr
    assert 'cannot reach ZooKeeper' in down.stderr
    assert noauth.returncode == UNAVAILABLE and 'credentials are needed' in noauth.stderr
    assert done['authed'].returncode == OK and 'No leases' in done['authed'].stdout


def test_usage_and_an_unreachable_broker_have_their_exit_status(scenario):
    s = scenario
    # Options belong to the sub-command (as celery inspect's): say where it goes.
    before = mutex_cli(s, '--json', 'list', hosts=False)
    assert before.returncode == USAGE
    assert '--json goes after the sub-command' in before.stderr
    both = mutex_cli(s, 'release', '--task', 'x', '--task-id', 'y')
    assert both.returncode == USAGE and 'exactly one of' in both.stderr

    # A lease to judge, so the workers must be asked; the broker is not there.
    held, _ = fake_lease(s, 'nobroker', worker='w9@elsewhere', pid=1)
    down = {'TEST_BROKER': DOWN_BROKER}
    runs = {
        'list': mutex_cli(s, 'list', '-j', env=down, start=True),
        'status': mutex_cli(s, 'status', env=down, start=True),
        'release': mutex_cli(s, 'release', '--yes', held, env=down, start=True),
    }
    done = {name: finish(proc) for name, proc in runs.items()}
    listing = done['list']
    assert listing.returncode == UNAVAILABLE, listing.stderr
    view = one_json_line(listing)  # ZooKeeper's view is still shown
    assert [lease['path'] for lease in view['leases']] == [held]
    assert 'could not ask the workers through the broker' in view['workers']['error']
    assert done['status'].returncode == UNAVAILABLE, done['status'].stderr
    assert 'could not ask the workers through the broker' in done['status'].stdout
    assert done['release'].returncode == UNAVAILABLE, done['release'].stderr
    assert 'could not ask the workers through the broker' in done['release'].stderr
    assert s.zk.exists(held)


