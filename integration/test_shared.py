"""Shared (read) leases against a real ZooKeeper: readers together, exclusive holders
alone, an exclusive waiter not starved, a dead reader's session frees the key."""
import threading

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError

from celery_mutex_bootstep.lease import LeaseOutcome

from .test_lease import make_leases, namespace, observer, wait_for  # noqa: F401 (fixtures)


def acquire(leases, key, shared=False):
    done = threading.Event()
    result = {}

    def cb(outcome, lease, exc):
        result.update(outcome=outcome, lease=lease, exc=exc)
        done.set()
    leases.acquire(key, b'{}', cb, shared=shared)
    assert done.wait(10), 'no answer from ZooKeeper'
    return result['outcome'], result['lease']


def watched(leases, key, shared=False):
    fired = threading.Event()
    leases.watch([key], fired.set, shared=shared)
    return fired


def test_readers_hold_together_and_exclude_an_exclusive_holder(make_leases, observer, namespace):
    a, b, w = make_leases(), make_leases(), make_leases()
    ra = acquire(a, 'k', shared=True)
    rb = acquire(b, 'k', shared=True)
    rb2 = acquire(b, 'k', shared=True)
    assert [r[0] for r in (ra, rb, rb2)] == [LeaseOutcome.ACQUIRED] * 3
    assert len(observer.get_children(f'{namespace}/k')) == 3
    assert rb[1].token > ra[1].token > 0
    assert acquire(w, 'k')[0] == LeaseOutcome.CONTENDED   # a writer cannot create the key
    fired = watched(w, 'k')
    for leases, (_, lease) in ((a, ra), (b, rb)):
        leases.release(lease)
    assert not fired.wait(0.5)                              # one reader still holds
    assert acquire(w, 'k')[0] == LeaseOutcome.CONTENDED
    b.release(rb2[1])
    assert fired.wait(5), 'the writer was not woken when the last reader left'
    assert wait_for(lambda: observer.exists(f'{namespace}/k') is None)
    outcome, lease = acquire(w, 'k')
    assert outcome == LeaseOutcome.ACQUIRED
    # and now readers are excluded, until the exclusive holder leaves
    assert acquire(a, 'k', shared=True)[0] == LeaseOutcome.CONTENDED
    woken = watched(a, 'k', shared=True)
    w.release(lease)
    assert woken.wait(5)
    assert acquire(a, 'k', shared=True)[0] == LeaseOutcome.ACQUIRED


def test_a_waiting_writer_is_not_starved_by_a_stream_of_readers(make_leases, observer, namespace):
    readers, w = make_leases(), make_leases()
    held = [acquire(readers, 'k', shared=True)[1]]
    assert acquire(w, 'k')[0] == LeaseOutcome.CONTENDED
    w.shared.writer_waits('k')          # what the gate does for a waiting exclusive call
    fired = watched(w, 'k')
    assert wait_for(lambda: observer.exists(f'{namespace}/.writer-waiting-k'))
    # New readers keep arriving: none may join while the writer waits.
    for _ in range(5):
        assert acquire(readers, 'k', shared=True)[0] == LeaseOutcome.CONTENDED
    reader_woken = watched(readers, 'k', shared=True)   # waits for the marker to go
    readers.release(held.pop())
    assert fired.wait(5)
    assert acquire(w, 'k')[0] == LeaseOutcome.ACQUIRED
    assert not reader_woken.is_set()
    w.shared.writer_done('k')           # granted: the marker goes
    assert reader_woken.wait(5)
    assert acquire(readers, 'k', shared=True)[0] == LeaseOutcome.CONTENDED  # writer holds


def test_an_expired_readers_session_frees_the_waiting_writer(zk, make_leases, observer, namespace):
    lost = []
    r = make_leases(on_lost=lambda leases, wait_until: lost.extend(leases))
    w = make_leases()
    _, lease = acquire(r, 'k', shared=True)
    assert acquire(w, 'k')[0] == LeaseOutcome.CONTENDED
    fired = watched(w, 'k')
    sid, passwd = r.client.client_id
    thief = KazooClient(hosts=zk.hosts, client_id=(sid, passwd))
    thief.start(timeout=10)
    thief.stop()                        # expires the reader's session at the server
    thief.close()
    # Its child vanished with the session; the parent is persistent, and is cleaned
    # by the waiting writer's worker, whose watch then fires.
    assert fired.wait(10), 'the writer was not woken after the reader expired'
    assert acquire(w, 'k')[0] == LeaseOutcome.ACQUIRED
    assert wait_for(lambda: lost, timeout=15) and lost == [lease] and lease.lost


def test_a_stale_empty_parent_is_cleaned_by_the_next_waiter(make_leases, observer, namespace):
    w = make_leases()
    observer.create(f'{namespace}/k', b'', makepath=True)
    observer.set(f'{namespace}/k', b'{"shared":true}')   # as a crashed reader leaves it
    assert acquire(w, 'k')[0] == LeaseOutcome.CONTENDED
    fired = watched(w, 'k')
    assert fired.wait(5)
    assert acquire(w, 'k')[0] == LeaseOutcome.ACQUIRED
    # A late reader release (delete at version 1) never deletes an exclusive lease node.
    with pytest.raises(BadVersionError):
        observer.delete(f'{namespace}/k', version=1)
    _, stat = observer.get(f'{namespace}/k')
    assert stat.ephemeralOwner == w.session_id and stat.version == 0


def test_mutex_list_reads_each_reader_as_a_lease_and_skips_an_empty_parent(
        make_leases, observer, namespace):
    from celery_mutex_bootstep.command.leases import read_leases
    from celery_mutex_bootstep.command.options import Target
    from celery_mutex_bootstep.options import MutexSettings
    digest, empty = 'a' * 64, 'b' * 64
    a, b = make_leases(), make_leases()
    la = acquire(a, digest, shared=True)[1]
    lb = acquire(b, digest, shared=True)[1]
    observer.create(f'{namespace}/{empty}', b'')   # a dead reader's parent
    observer.set(f'{namespace}/{empty}', b'{"shared":true}')
    target = Target(settings=MutexSettings.from_app({}), namespace=namespace,
                    hosts_source='test')
    found = read_leases(observer, target, 5)
    assert sorted((n.path, n.session_id, n.digest) for n in found) == sorted(
        [(la.path, a.session_id, digest), (lb.path, b.session_id, digest)])
    assert all(n.token == (la if n.path == la.path else lb).token for n in found)


def test_a_readers_watch_on_other_readers_fires_at_once_a_writers_waits(make_leases, namespace):
    r, w = make_leases(), make_leases()
    _, lease = acquire(r, 'k', shared=True)
    writer = watched(w, 'k')
    assert wait_for(lambda: w.watches.known_held(f'{namespace}/k'))
    # a reader queued on w (behind an exclusive call that was in flight) need not wait
    # for the readers to finish: it may join them; asked again once w's watch is armed
    assert watched(w, 'k', shared=True).wait(5)
    assert watched(w, 'k', shared=True).is_set()
    assert not writer.wait(0.3)
    assert acquire(w, 'k', shared=True)[0] == LeaseOutcome.ACQUIRED
