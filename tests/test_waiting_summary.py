"""The per-key summary of what waits in a worker, and the gauges built from it
(through real workers: integration/test_waiting.py)."""
from types import SimpleNamespace

from celery_mutex_bootstep.parked_view import ParkedView
from celery_mutex_bootstep.waiting import SINCE_HEADER, waiting_since
from celery_mutex_bootstep.waiting_summary import (ConsumerGauges, waiting_gauges,
                                                   waiting_summary)


def key(digest):
    return SimpleNamespace(digest=digest, describe=lambda: f'task[key={digest!r}]')


def held(digest, since):
    return SimpleNamespace(key=key(digest), waiting_since=since)


def parked_keys(flagged, view):
    return SimpleNamespace(flagged={d: key(d) for d in flagged},
                           lot=SimpleNamespace(view=view))


def test_room_and_parked_waiters_per_key_longest_wait_first():
    view = ParkedView()
    view.measured('hot', 7)
    view.parked('hot', parked_at=95.0, since=95.0)   # the 8th, parked by this worker
    view.measured('done', 0)
    room = [held('hot', 90.0), held('hot', 92.0), held('warm', 99.0)]
    summary = waiting_summary(room, parked_keys(['hot', 'done', 'new'], view), now=100.0)
    rows = {e['key']: e for e in summary['waiting_keys']}
    assert [e['key'] for e in summary['waiting_keys']] == ['hot', 'warm', 'new']
    assert rows['hot'] == {'key': 'hot', 'mutex': "task[key='hot']", 'waiting': 2,
                           'parked': 8, 'oldest_wait': 10.0, 'oldest_parked_wait': 5.0}
    assert rows['warm']['parked'] is None, 'no park queue followed for it here'
    assert rows['new']['parked'] is None and rows['new']['oldest_wait'] is None
    assert 'done' not in rows, 'a park queue found empty: nothing waits'
    assert summary['waiting_totals'] == {'keys': 3, 'waiting': 3, 'parked_keys': 3,
                                         'parked': 8, 'oldest_wait': 10.0}


def test_without_parking_only_the_room_counts_and_nothing_waiting_is_zero():
    summary = waiting_summary([held('k', 40.0)], None, now=50.0)
    assert summary['waiting_keys'][0]['oldest_wait'] == 10.0
    assert summary['waiting_totals']['parked_keys'] == 0
    assert waiting_gauges([], None) == {'waiting': 0, 'parked_keys': 0,
                                        'parked_messages': 0, 'oldest_wait_seconds': 0.0}


def test_a_message_keeps_the_time_it_first_waited_across_parks():
    headers = {SINCE_HEADER: 123.5}
    req = SimpleNamespace(message=SimpleNamespace(headers=headers))
    assert waiting_since(req) == 123.5
    headers[SINCE_HEADER] = 1.0
    assert waiting_since(req) == 123.5, 'remembered on the request'
    future = SimpleNamespace(message=SimpleNamespace(headers={SINCE_HEADER: 1e12}))
    assert waiting_since(future) < 1e12, 'a time from the future is not believed'


def test_gauges_are_computed_through_the_consumer_and_a_busy_one_serves_the_last():
    computed, queued = [], []

    def compute():
        computed.append(1)
        return {'waiting': len(computed)}
    gauges = ConsumerGauges(compute, lambda fun, *args: fun(*args), wait=0.01)
    assert gauges() == {'waiting': 1} and gauges() == {'waiting': 2}
    gauges.post = lambda fun, *args: queued.append((fun, args))  # the consumer is busy
    assert gauges() == {'waiting': 2} and gauges() == {'waiting': 2}
    assert len(queued) == 1, 'one request at a time, not one per scrape'
    fun, args = queued[0]
    fun(*args)                           # it answers, late
    assert gauges() == {'waiting': 3} and len(computed) == 3
