"""The waiting room's prefetch compensation, on kombu's real QoS object."""
from types import SimpleNamespace

from kombu.common import QoS

from celery_mutex_bootstep.waiting import WaitingRoom


class Timer:
    def call_after(self, *args, **kwargs):
        return object()

    def cancel(self, entry):
        pass


def room(qos, max_held=64):
    consumer = SimpleNamespace(qos=qos, timer=Timer())
    return WaitingRoom(consumer, max_held, on_expire=lambda held: None,
                       later=lambda delay, fun, *args: object())


def key(digest):
    return SimpleNamespace(digest=digest)


def test_holding_and_leaving_restores_the_prefetch_count_exactly():
    qos = QoS(lambda prefetch_count: None, 8)
    r = room(qos)
    held = [r.hold(object(), key(f'k{i}'), 1.0, i) for i in range(5)]
    assert qos.value == 13
    for h in held:
        r.leave(h)
    assert qos.value == 8


def test_a_capped_increment_is_not_undone_as_if_it_had_applied():
    # worker_eta_task_limit sets max_prefetch: kombu caps increments, not decrements.
    qos = QoS(lambda prefetch_count: None, 8, max_prefetch=10)
    r = room(qos)
    held = [r.hold(object(), key(f'k{i}'), 1.0, i) for i in range(5)]
    assert qos.value == 10
    for h in held:
        r.leave(h)
    assert qos.value == 8, 'a capped hold must not lower the prefetch count for good'


def test_unlimited_prefetch_stays_unlimited():
    qos = QoS(lambda prefetch_count: None, 0)
    r = room(qos)
    h = r.hold(object(), key('k'), 1.0, 0)
    r.leave(h)
    assert qos.value == 0
