"""poll_select keeps the semantics kazoo's connection thread relies on."""
import os
import socket
import time

import pytest
from kazoo.handlers.utils import selector_select

from celery_mutex_bootstep.zkhandler import PollingThreadingHandler, default_handler, poll_select


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize('select', [poll_select, selector_select])
def test_ready_objects_of_the_lists_given(select, pair):
    a, b = pair
    c, d = socket.socketpair()
    try:
        assert select([a, c], [], [], 0) == ([], [], [])
        b.send(b'x')
        assert select([a, c], [], [], 1.0)[0] == [a]
        assert select([], [a], [], 1.0)[1] == [a]  # an empty buffer is writable
        assert select([c], [a], [], 1.0)[:2] == ([], [a])
    finally:
        c.close()
        d.close()


@pytest.mark.parametrize('select', [poll_select, selector_select])
def test_time_out_waits_and_returns_empty_lists(select, pair):
    a, _ = pair
    start = time.monotonic()
    assert select([a], [], [], 0.05) == ([], [], [])
    assert time.monotonic() - start >= 0.045


def test_a_short_time_out_is_not_rounded_down_to_a_spin(pair):
    a, _ = pair
    start = time.monotonic()
    assert poll_select([a], [], [], 0.0004) == ([], [], [])
    assert time.monotonic() - start >= 0.0004


@pytest.mark.parametrize('select', [poll_select, selector_select])
def test_a_hang_up_is_reported_readable(select, pair):
    a, b = pair
    b.close()
    assert select([a], [], [], 1.0)[0] == [a]
    assert a.recv(1) == b''  # kazoo then drops the connection


@pytest.mark.parametrize('select', [poll_select, selector_select])
def test_a_closed_socket_is_refused(select, pair):
    a, _ = pair
    a.close()
    with pytest.raises(TypeError):
        select([a], [], [], 0)


def test_a_descriptor_not_open_is_a_value_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError):
        poll_select([r], [], [], 0)


@pytest.mark.parametrize('bad', ['1', -1])
def test_bad_time_outs_are_refused_as_kazoo_does(pair, bad):
    a, _ = pair
    with pytest.raises((TypeError, ValueError)):
        poll_select([a], [], [], bad)


def test_the_step_uses_the_polling_handler_unless_told_otherwise():
    from kazoo.handlers.threading import SequentialThreadingHandler

    from celery_mutex_bootstep.lease import ZooKeeperLeases
    leases = ZooKeeperLeases('127.0.0.1:1', '/ns')
    assert isinstance(leases.client.handler, PollingThreadingHandler)
    assert isinstance(default_handler(), PollingThreadingHandler)
    own = SequentialThreadingHandler()
    leases = ZooKeeperLeases('127.0.0.1:1', '/ns', client_options={'handler': own})
    assert leases.client.handler is own
