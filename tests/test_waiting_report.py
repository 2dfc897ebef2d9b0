"""How ``celery mutex list`` merges what waits (the command itself, on real
workers and brokers: integration/test_waiting.py)."""
from types import SimpleNamespace

from celery_mutex_bootstep.waiting_report import Waiting, collect

HOT, COLD, GONE = 'a' * 64, 'b' * 64, 'c' * 64


def lease(digest):
    return SimpleNamespace(digest=digest, task='proj.charge',
                           data={'mutex': 'proj.charge', 'keys': ['account']},
                           key_values=lambda: [('account', 7)])


def test_room_waiters_add_up_and_the_broker_count_replaces_the_workers_view():
    replies = {
        'w1': {'waiting_keys': [{'key': HOT, 'mutex': 'proj.charge[account=7]', 'waiting': 2,
                                 'parked': 10, 'oldest_wait': 4.0}]},
        'w2': {'waiting_keys': [{'key': HOT, 'waiting': 1, 'parked': 12, 'oldest_wait': 9.0},
                                {'key': COLD, 'waiting': 0, 'parked': 3, 'oldest_wait': 1.0}]},
    }
    rows = {r.key: r for r in collect([lease(HOT)], replies, {HOT: 11})}
    hot = rows[HOT]
    assert (hot.holders, hot.in_workers, hot.parked, hot.parked_from) == (1, 3, 11, 'broker')
    assert hot.waiting == 14 and hot.oldest_wait == 9.0
    assert set(hot.workers) == {'w1', 'w2'} and hot.workers['w2']['parked'] == 12
    # not counted on the broker: the most any follower knows (they count the same queue)
    assert (rows[COLD].parked, rows[COLD].parked_from, rows[COLD].holders) == (3, 'workers', 0)


def test_an_older_worker_counts_by_its_waiting_list_and_empty_lines_are_left_out():
    replies = {'old': {'waiting': [{'key': HOT, 'waited': 2.5}, {'key': HOT, 'waited': 0.5}]}}
    rows = collect([lease(HOT), lease(HOT)], replies, {GONE: 0})  # two slots held
    assert [(r.key, r.in_workers, r.parked, r.oldest_wait, r.holders) for r in rows] == [
        (HOT, 2, None, 2.5, 2)]
    assert rows[0].mutex == 'proj.charge[account=7]', 'described from its lease'


def test_parked_lines_nobody_holds_and_the_table():
    rows = collect([], {}, {GONE: 5, HOT: 0}, {GONE: {'queue': 'q', 'mutex': 'proj.charge'}})
    waits = Waiting(rows)
    assert waits.totals() == {'keys': 1, 'waiting': 5, 'in_workers': 0, 'parked': 5,
                              'oldest_wait': None}
    text = waits.render()
    assert 'Waiting: 5 message(s) for 1 key(s), 0 in the workers\' consumers and 5 parked' in text
    assert 'known only to the workers that parked them' in text
    row = [line for line in text.splitlines() if line.strip().startswith(GONE[:12])]
    assert row and row[0].split()[1:] == ['proj.charge', '0', '5', '0', '5', '-'], text
    assert 'no message waits' in Waiting([]).render()
    partial = Waiting(collect([], {'w': {'waiting_keys': [
        {'key': HOT, 'waiting': 1, 'parked': 4, 'oldest_wait': 3.0}]}}, {}), 'broker down')
    assert 'broker down' in partial.render() and ' 4* ' in partial.render()
