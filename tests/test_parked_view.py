"""ParkedView: what a worker knows of its park queues, without asking the broker
(the counts against a real broker: integration/test_waiting.py)."""
from celery_mutex_bootstep.parked_view import ParkedView


def test_the_count_is_unknown_until_measured_then_follows_own_parks_and_unparks():
    view = ParkedView()
    view.parked('d', parked_at=10.0, since=9.0)
    assert view.lines() == {'d': (None, 9.0)}
    view.measured('d', 5)              # other workers parked too
    view.parked('d', parked_at=11.0, since=11.0)
    assert view.lines()['d'][0] == 6
    view.unparked('d', parked_at=1.0)  # someone's older message left the head
    assert view.lines()['d'] == (5, 9.0)


def test_an_unparked_head_takes_every_earlier_park_with_it():
    view = ParkedView()
    for i in range(4):
        view.parked('d', parked_at=100.0 + i, since=50.0 + i)
    view.unparked('d', parked_at=101.0)  # FIFO: the parks at 100 and 101 are gone
    assert view.lines()['d'] == (None, 52.0)
    view.unparked('d', parked_at=None)   # a head without a stamp: nothing known to go
    assert view.lines()['d'] == (None, 52.0)


def test_a_measured_count_keeps_only_the_newest_of_ours():
    view = ParkedView()
    for i in range(5):
        view.parked('d', parked_at=float(i), since=float(i))
    view.measured('d', 2)                # another worker unparked three of ours
    assert view.lines()['d'] == (2, 3.0)
    view.measured('d', 0)
    assert view.lines()['d'] == (0, None)


def test_a_re_parked_old_waiter_is_the_oldest_though_parked_last():
    view = ParkedView()
    view.parked('d', parked_at=10.0, since=10.0)
    view.parked('d', parked_at=11.0, since=2.0)  # waited in a room for long first
    view.unparked('d', parked_at=10.0)
    assert view.lines()['d'][1] == 2.0


def test_memory_is_bounded_and_the_age_never_understated():
    view = ParkedView(runs_max=3)
    for i in range(10):
        view.parked('d', parked_at=float(i), since=float(i))
    assert len(view._lines['d'].runs) == 3
    assert view.lines()['d'][1] == 0.0
    view.unparked('d', parked_at=1.0)
    # the last run stands for the parks at 2..9: it leaves only once its newest did
    assert view.lines()['d'][1] == 2.0
    view.unparked('d', parked_at=5.0)
    assert view.lines()['d'][1] == 2.0
    view.measured('d', 3)              # only the newest three can still be there
    assert view._lines['d'].tracked == 3 and view.lines()['d'] == (3, 2.0)
    view.unparked('d', parked_at=9.0)
    assert view.lines()['d'] == (2, None)


def test_retain_forgets_unfollowed_keys_and_due_measures_the_stalest_first():
    view = ParkedView()
    view.measured('a', 1, now=5.0)
    view.measured('b', 1, now=1.0)
    view.parked('c', parked_at=1.0, since=1.0)  # never measured
    assert view.due(['a', 'b', 'c'], 2) == ['c', 'b']
    view.retain(['a'])
    assert set(view.lines()) == {'a'}
