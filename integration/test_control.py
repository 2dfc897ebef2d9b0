"""``celery inspect mutex_leases`` and ``celery control mutex_release`` as an
operator runs them: a subprocess with an app module that never imports the
step, against a real worker that has it."""
import json
import subprocess
import sys

from .scenario import wait_for
from .workers import REPO_ROOT, worker_env


def celery_cli(s, *args):
    cmd = [sys.executable, '-m', 'celery', '-A', 'integration.bareapp', *args]
    return subprocess.run(cmd, env=worker_env(s.env()), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_inspect_and_control_from_an_app_that_never_imports_the_step(scenario):
    s = scenario
    w = s.worker('w1', concurrency=2)
    holder = s.send('work', 'ctl', 60.0, 0)
    other = s.send('work', 'ctl-key', 60.0, 1)
    wait_for(lambda: s.records.count('start') == 2, message='holders started')

    out = celery_cli(s, 'inspect', 'mutex_leases', '-d', s.nodename(w), '--json')
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)[s.nodename(w)]
    assert sorted(lease['task_id'] for lease in info['leases']) == sorted([holder.id, other.id])

    bad = celery_cli(s, 'control', 'mutex_release', 'bogus', '-d', s.nodename(w), '--json')
    assert 'bad argument' in bad.stdout + bad.stderr and "'bogus'" in bad.stdout + bad.stderr

    # documented usage: the task id by name (it used to arrive as key='task_id=...')
    out = celery_cli(s, 'control', 'mutex_release', f'task_id={holder.id}',
                     '-d', s.nodename(w), '--json')
    assert out.returncode == 0, out.stderr
    replies = json.loads(out.stdout)  # `celery control --json`: a list of {node: reply}
    reply = next(r[s.nodename(w)] for r in replies if s.nodename(w) in r)
    assert reply.get('ok'), reply
    def leases():
        replies = s.client.control.inspect([s.nodename(w)], timeout=3)._request('mutex_leases')
        return list(replies.values())[0]['leases']
    wait_for(lambda: [lease['task_id'] for lease in leases()] == [other.id],
             message='the lease released')

    # by key: the node's name, as celery mutex list shows it
    key = s.lease_path('work', 'ctl-key').rsplit('/', 1)[1]
    out = celery_cli(s, 'control', 'mutex_release', f'key={key}', '-d', s.nodename(w), '--json')
    assert out.returncode == 0, out.stderr
    reply = next(r[s.nodename(w)] for r in json.loads(out.stdout) if s.nodename(w) in r)
    assert [a['task_id'] for a in reply.get('ok') or ()] == [other.id], reply
    wait_for(lambda: leases() == [], message='the lease released by key')
    assert w.is_running()
