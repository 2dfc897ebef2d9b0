"""Counters and the hold-time histogram: through inspect and through Prometheus."""
import urllib.request

from .scenario import wait_for
from .zkserver import find_free_port


def test_counters_histogram_and_prometheus_export(scenario):
    s = scenario
    port = find_free_port()
    w = s.worker('w1', concurrency=2, env={'TEST_PROMETHEUS_PORT': str(port)})
    holder = s.send('work', 'm', 1.0, 0)
    wait_for(lambda: s.records.count('start') == 1, message='holder')
    waiter = s.send('work', 'm', 0, 1)
    assert [holder.get(timeout=20), waiter.get(timeout=20)] == [0, 1]
    replies = s.client.control.inspect([s.nodename(w)], timeout=3)._request('mutex_leases')
    info = list(replies.values())[0]
    assert info['counters']['acquired'] == 2 and info['counters']['released'] == 2
    assert info['counters']['contended'] >= 1
    hist = info['hold_seconds']
    assert hist['count'] == 2 and hist['buckets']['+Inf'] == 2 and hist['sum'] >= 1.0
    assert hist['buckets']['0.5'] == 1, 'one short hold, one of about a second'
    text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5).read().decode()
    assert 'celery_mutex_acquired_total{worker="%s"} 2.0' % s.nodename(w) in text
    assert 'celery_mutex_hold_seconds_count{worker="%s"} 2.0' % s.nodename(w) in text
    # the gauges of what waits: nothing now, and no per-key label on any of them
    for gauge in ('waiting', 'parked_keys', 'parked_messages', 'oldest_wait_seconds'):
        assert 'celery_mutex_%s{worker="%s"} 0.0' % (gauge, s.nodename(w)) in text, text


def test_two_workers_on_one_host_with_one_prometheus_port(scenario):
    """The second worker moves to the next free port instead of failing to bind
    (which used to surface as a broker connection error, then kill the worker)."""
    s = scenario
    port = find_free_port()
    env = {'TEST_PROMETHEUS_PORT': str(port)}
    w1 = s.worker('w1', concurrency=1, env=env)
    w2 = s.worker('w2', concurrency=1, env=env)
    for i in range(4):
        s.send('work', f'p{i}', 0, i).get(timeout=20)
    replies = s.client.control.inspect([s.nodename(w1), s.nodename(w2)],
                                       timeout=3)._request('mutex_leases')
    assert len(replies) == 2, replies
    addresses = {name: info['prometheus'] for name, info in replies.items()}
    ports = sorted(int(a.rsplit(':', 1)[1]) for a in addresses.values())
    assert ports[0] == port and ports[1] != port, addresses
    total = 0
    for name, address in addresses.items():
        text = urllib.request.urlopen(
            f'http://127.0.0.1:{address.rsplit(":", 1)[1]}/metrics', timeout=5).read().decode()
        # each exporter serves its own worker's counters only (a private registry)
        assert f'worker="{name}"' in text
        assert [n for n in addresses if n != name][0] not in text
        for line in text.splitlines():
            if line.startswith('celery_mutex_acquired_total{'):
                total += float(line.split()[-1])
    assert total == 4
    assert w1.is_running() and w2.is_running()
