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
