"""What waits, per key, as users see it: ``celery mutex list`` (a subprocess),
``celery inspect mutex_leases`` and the Prometheus gauges, against real
ZooKeeper, brokers (RabbitMQ; Redis too for a line whose parker died) and
prefork workers that park a hot key's waiters.

While a key is held nothing of it runs, so every message sent for it is in a
worker's consumer or in its park queue once deliveries settle: the counts
must add up to what was sent."""
import json
import re
import time
import urllib.request
import uuid

import pytest

from celery_mutex_bootstep.keys import key_digest
from celery_mutex_bootstep.parking import park_queue_name

from .records import overlaps
from .scenario import APP, wait_for
from .test_command import mutex_cli
from .test_control import celery_cli
from .zkserver import find_free_port

N = 12


def inspect(s, workers):
    names = [s.nodename(w) for w in workers]
    replies = s.client.control.inspect(names, timeout=3)._request('mutex_leases') or {}
    return {name: info for name, info in replies.items() if name in names}


def entry(info, digest):
    found = [e for e in info.get('waiting_keys') or () if e['key'] == digest]
    return found[0] if found else None


def in_room(info, digest):
    """Room waiters of ``digest`` by the per-message list (not the summary)."""
    return sum(1 for h in info['waiting'] if h['key'] == digest)


def parked_on_broker(s, digest):
    with s.client.connection_for_read() as conn:
        try:
            return conn.default_channel.queue_declare(
                queue=park_queue_name(s.namespace, digest), passive=True).message_count
        except conn.channel_errors:  # never declared (or Redis dropped it empty)
            return 0


def gauges(address, worker):
    text = urllib.request.urlopen(f'http://127.0.0.1:{address.rsplit(":", 1)[1]}/metrics',
                                  timeout=5).read().decode()
    found = {}
    for name in ('waiting', 'parked_keys', 'parked_messages', 'oldest_wait_seconds'):
        m = re.search(r'^celery_mutex_%s\{worker="%s"\} (\S+)$' % (name, re.escape(worker)),
                      text, re.M)
        assert m, (name, text)
        found[name] = float(m.group(1))
    return found


def settled(s, workers, digest, n):
    """The workers' room waiters + the parked messages == ``n``, nothing being parked."""
    infos = inspect(s, workers)
    if len(infos) != len(workers) or any(i.get('parking') for i in infos.values()):
        return None
    room = sum(in_room(i, digest) for i in infos.values())
    parked = parked_on_broker(s, digest)
    return (infos, room, parked) if room + parked == n else None


def test_list_inspect_and_metrics_count_the_waiters_of_a_held_key(scenario):
    s = scenario
    env = {'TEST_PROMETHEUS_PORT': str(find_free_port())}
    workers = [s.worker('w1', concurrency=2, env=env, wait=False),
               s.worker('w2', concurrency=2, env=env)]
    workers[0].wait_ready()
    value = f'vis-{uuid.uuid4().hex[:8]}'  # a digest no other test's worker can hold
    digest = key_digest(f'{APP}.work', [value])
    holder = s.send('work', value, 300.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder running')
    sent_at = time.time()
    waiters = [s.send('work', value, 0, i) for i in range(1, N + 1)]
    infos, room, parked = wait_for(lambda: settled(s, workers, digest, N), timeout=60,
                                   interval=0.5, message='every waiter in a room or parked')
    assert parked > 0, 'each worker keeps limit+1 = 2 in its room: the rest are parked'

    # Each worker's summary agrees with its own per-message list.
    for name, info in infos.items():
        e = entry(info, digest)
        assert (e['waiting'] if e else 0) == in_room(info, digest), info
        if e:
            assert e['mutex'] == f"{APP}.work[key={value!r}]"
            assert 0 < e['oldest_wait'] <= time.time() - sent_at + 0.01

    # celery mutex list: the holder, and N waiting (room + parked) with the oldest wait.
    listed = mutex_cli(s, 'list', '--json')
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    (row,) = [k for k in data['waiting']['by_key'] if k['key'] == digest]
    assert (row['holders'], row['waiting'], row['in_workers'], row['parked']) == (
        1, N, room, parked), row
    assert row['parked_from'] == 'broker' and row['mutex'] == f"{APP}.work[key={value!r}]"
    assert 0 < row['oldest_wait'] <= time.time() - sent_at + 0.01
    assert sum(w['waiting'] for w in row['workers'].values()) == room
    assert data['waiting']['waiting'] >= N
    table = mutex_cli(s, 'list')
    assert table.returncode == 0, table.stderr
    lines = [line.split() for line in table.stdout.splitlines()
             if line.startswith('  ' + digest[:12])]
    assert len(lines) == 1 and lines[0][2:6] == ['1', str(N), str(room), str(parked)], \
        table.stdout
    assert [line for line in table.stdout.splitlines() if line.startswith(digest[:12])], \
        'the lease row is still there, unchanged in place'

    # Each worker that parked follows the line: its count catches up with the
    # broker's at its next sweep, and it knows how long its parked ones waited.
    parkers = [n for n, i in infos.items() if i['counters']['parked']]
    assert parkers

    def followers_know():
        now = inspect(s, workers)
        es = {n: entry(now[n], digest) for n in parkers if n in now}
        return len(es) == len(parkers) and all(e and e['parked'] == parked for e in es.values()) \
            and es
    known = wait_for(followers_know, timeout=30, interval=0.5, message='parked counts')
    for e in known.values():
        assert 0 < e['oldest_parked_wait'] <= e['oldest_wait'], \
            'the parked ones were sent after the room waiters'
    # ... as `celery inspect mutex_leases` shows it, and the oldest wait grows.
    out = celery_cli(s, 'inspect', 'mutex_leases', '-d', parkers[0], '--json')
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)[parkers[0]]
    first = entry(cli, digest)
    assert first['parked'] == parked and cli['waiting_totals']['parked_keys'] == 1
    wait_for(lambda: entry(inspect(s, workers)[parkers[0]], digest)['oldest_wait']
             > first['oldest_wait'], timeout=30, interval=0.5, message='the wait growing')

    # Prometheus: per worker, no per-key label.
    for name, info in inspect(s, workers).items():
        g = gauges(info['prometheus'], name)
        assert g['waiting'] == in_room(info, digest), (name, g)
        if name in parkers:
            assert g['parked_keys'] == 1 and g['parked_messages'] == parked, g
        if g['waiting'] or name in parkers:
            assert g['oldest_wait_seconds'] > 0, g

    # The key freed: every waiter runs, once at a time, and nothing waits any more.
    holding = [n for n, i in infos.items() if i['leases']]
    replies = s.client.control.broadcast('mutex_release', arguments={'task_id': holder.id},
                                         destination=holding, reply=True, timeout=5)
    assert any(r.get(holding[0], {}).get('ok') for r in replies), replies
    assert sorted(h.get(timeout=120) for h in waiters) == list(range(1, N + 1))
    runs = [r for r in s.records.executions() if r.key == value and r.extra['seq']]
    assert len(runs) == N and overlaps(runs) == []

    def drained():
        now = inspect(s, workers)
        return len(now) == 2 and all(i['waiting_totals']['keys'] == 0 for i in now.values())
    wait_for(drained, timeout=30, interval=0.5, message='nothing waiting')
    for name, info in inspect(s, workers).items():
        g = gauges(info['prometheus'], name)
        assert g['waiting'] == 0 and g['oldest_wait_seconds'] == 0, g
    after = json.loads(mutex_cli(s, 'list', '--json').stdout)
    assert [k for k in after['waiting']['by_key'] if k['key'] == digest] == []


@pytest.mark.parametrize('broker', ['rabbitmq', 'redis'])
def test_a_line_nobody_follows_is_listed_from_zookeeper_and_the_broker(scenario_for, broker):
    s = scenario_for(broker)
    a = s.worker('a', concurrency=2, extra_args=['--mutex-session-timeout', '4'])
    value = f'orphan-{uuid.uuid4().hex[:8]}'
    digest = key_digest(f'{APP}.work_late', [value])
    s.send('work_late', value, 60.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder running')
    for i in range(1, 9):
        s.send('work_late', value, 0, i)
    _, room, parked = wait_for(lambda: settled(s, [a], digest, 8), timeout=60, interval=0.5,
                               message='every waiter in the room or parked')
    assert room and parked
    a.kill()        # its room waiters leave the count; the parked ones stay
    a.kill_group()
    path = f'{s.namespace}/{digest}'
    wait_for(lambda: not s.zk.exists(path), timeout=30, message='the lease gone with its session')

    listed = mutex_cli(s, 'list', '--json')
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data['leases'] == []
    (row,) = [k for k in data['waiting']['by_key'] if k['key'] == digest]
    assert (row['holders'], row['in_workers'], row['parked'], row['parked_from']) == (
        0, 0, parked, 'broker'), row
    assert row['oldest_wait'] is None, 'only the dead worker knew how long they waited'
    assert row['mutex'] == f'{APP}.work_late', 'named by the park queue\'s registration'
    table = mutex_cli(s, 'list')
    assert table.stdout.startswith('No leases in'), table.stdout
    lines = [line.split() for line in table.stdout.splitlines()
             if line.startswith('  ' + digest[:12])]
    assert len(lines) == 1 and lines[0][1:] == [
        f'{APP}.work_late', '0', str(parked), '0', str(parked), '-'], table.stdout
