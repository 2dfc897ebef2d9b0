"""ZooKeeperLeases against a real ZooKeeper: acquire, contend, release, session loss."""
import threading
import time
import uuid

import pytest
from kazoo.client import KazooClient

from celery_mutex_bootstep.lease import LeaseOutcome, ZooKeeperLeases


def wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def acquire(leases, key, data=b'{}'):
    done = threading.Event()
    result = {}

    def cb(outcome, lease, exc):
        result.update(outcome=outcome, lease=lease, exc=exc)
        done.set()
    leases.acquire(key, data, cb)
    assert done.wait(10), 'no answer from ZooKeeper'
    return result['outcome'], result['lease']


@pytest.fixture
def namespace():
    return f'/lease-test-{uuid.uuid4().hex[:8]}'


@pytest.fixture
def make_leases(zk, namespace):
    made = []

    def make(**kwargs):
        leases = ZooKeeperLeases(zk.hosts, namespace, session_timeout=4, **kwargs)
        leases.start()
        assert wait_for(lambda: leases.connected), 'no session'
        made.append(leases)
        return leases
    yield make
    for leases in made:
        leases.close()


@pytest.fixture
def observer(zk):
    client = KazooClient(hosts=zk.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def test_one_holder_per_key_and_tokens_grow(make_leases, observer, namespace):
    a, b = make_leases(), make_leases()
    outcome, lease = acquire(a, 'k1')
    assert outcome == LeaseOutcome.ACQUIRED and lease.token > 0
    data, stat = observer.get(f'{namespace}/k1')
    assert stat.ephemeralOwner == a.session_id == lease.session_id
    assert stat.czxid == lease.token
    assert acquire(b, 'k1')[0] == LeaseOutcome.CONTENDED
    assert acquire(a, 'k1')[0] == LeaseOutcome.CONTENDED  # not re-entrant
    assert acquire(b, 'k2')[0] == LeaseOutcome.ACQUIRED   # other keys are free
    assert a.release(lease) is True
    assert wait_for(lambda: observer.exists(f'{namespace}/k1') is None)
    outcome, lease2 = acquire(b, 'k1')
    assert outcome == LeaseOutcome.ACQUIRED and lease2.token > lease.token


def test_release_is_idempotent_across_threads(make_leases, observer, namespace):
    a = make_leases()
    _, lease = acquire(a, 'k')
    results = []
    barrier = threading.Barrier(8)

    def release():
        barrier.wait()
        results.append(a.release(lease))
    threads = [threading.Thread(target=release) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and results.count(False) == 7
    assert wait_for(lambda: observer.exists(f'{namespace}/k') is None)


def test_expired_session_never_deletes_the_next_holders_node(zk, make_leases, observer, namespace):
    lost = []
    a = make_leases(on_lost=lambda leases, wait_until: lost.extend(leases))
    b = make_leases()
    _, lease = acquire(a, 'k')
    old_session = a.session_id
    # Expire a's session at the server, as a long partition would.
    sid, passwd = a.client.client_id
    thief = KazooClient(hosts=zk.hosts, client_id=(sid, passwd))
    thief.start(timeout=10)
    thief.stop()
    thief.close()
    assert wait_for(lambda: observer.exists(f'{namespace}/k') is None)
    outcome, lease_b = acquire(b, 'k')
    assert outcome == LeaseOutcome.ACQUIRED
    assert wait_for(lambda: lost, timeout=15), 'a never noticed its session was lost'
    assert lost == [lease] and lease.lost
    assert wait_for(lambda: a.connected and a.session_id != old_session, timeout=15)
    a.release(lease)  # must not touch b's node at the same path
    # ZooKeeper applies one client's requests in order: once this later request of
    # a's is answered, any delete the release sent has been applied (no fixed sleep).
    assert acquire(a, 'other')[0] == LeaseOutcome.ACQUIRED  # a works again, too
    _, stat = observer.get(f'{namespace}/k')
    assert stat.ephemeralOwner == b.session_id


def test_unavailable_when_not_connected(namespace):
    leases = ZooKeeperLeases('127.0.0.1:1', namespace, session_timeout=4)
    leases.start()
    try:
        assert acquire(leases, 'k')[0] == LeaseOutcome.UNAVAILABLE
    finally:
        leases.close()


def test_an_idle_session_outlives_its_timeout_on_the_polling_handler(make_leases, observer,
                                                                      namespace):
    """kazoo's pings go out when the connection thread's select times out: with
    the step's handler (zkhandler.py) an idle session lasts, and a lease with it."""
    from celery_mutex_bootstep.zkhandler import PollingThreadingHandler
    leases = make_leases()
    assert isinstance(leases.client.handler, PollingThreadingHandler)
    outcome, lease = acquire(leases, 'idle')
    assert outcome == LeaseOutcome.ACQUIRED
    session = leases.client.client_id
    time.sleep(leases.session_timeout * 1.5)
    assert leases.connected and leases.client.client_id == session
    assert observer.exists(lease.path).ephemeralOwner == session[0]
    leases.release(lease)
    assert wait_for(lambda: observer.exists(lease.path) is None)


def test_close_removes_every_lease_node(make_leases, observer, namespace):
    a = make_leases()
    for i in range(5):
        assert acquire(a, f'k{i}')[0] == LeaseOutcome.ACQUIRED
    def leases_in_ns():
        return [n for n in observer.get_children(namespace) if not n.startswith('.')]
    assert len(leases_in_ns()) == 5
    a.close()
    assert observer.get_children(namespace) == [], 'lease and clock nodes are gone'


def test_batched_acquisitions_keep_tokens_and_fall_back_on_contention(zk, namespace, observer):
    scheduled = []
    leases = ZooKeeperLeases(zk.hosts, namespace, session_timeout=4, schedule=scheduled.append)
    leases.start()
    try:
        assert wait_for(lambda: leases.connected and leases._clock is not None)
        answers = []
        done = threading.Event()

        def cb(outcome, lease, exc):
            answers.append((outcome, lease))
            if len(answers) == 5:
                done.set()
        for i in range(5):
            leases.acquire(f'b{i}', b'{}', cb)
        assert len(scheduled) == 1, 'one flush for the whole turn'
        scheduled.pop()()
        assert done.wait(10)
        assert leases.stats['create_batches'] == 1
        tokens = []
        for outcome, lease in answers:
            assert outcome == LeaseOutcome.ACQUIRED, (answers, leases.stats)
            _, stat = observer.get(lease.path)
            assert stat.czxid == lease.token and stat.ephemeralOwner == leases.session_id
            tokens.append(lease.token)
        assert len(set(tokens)) == 1, 'one multi: one creation zxid'
        # A batch with one held key fails as a whole and falls back key by key.
        answers.clear()
        done.clear()
        for i in range(4, 9):
            leases.acquire(f'b{i}', b'{}', cb)
        scheduled.pop()()
        assert done.wait(10)
        outcomes = sorted(o for o, _ in answers)
        assert outcomes.count(LeaseOutcome.CONTENDED) == 1
        assert outcomes.count(LeaseOutcome.ACQUIRED) == 4
    finally:
        leases.close()


def test_releases_of_a_turn_ride_with_its_creates_and_fall_apart_on_contention(
        zk, namespace, observer):
    """A holder's end and the next task's start cost ZooKeeper one write; when
    the multi cannot apply (a key held elsewhere) the release still happens."""
    scheduled = []
    leases = ZooKeeperLeases(zk.hosts, namespace, session_timeout=4, schedule=scheduled.append)
    leases.start()
    try:
        assert wait_for(lambda: leases.connected and leases._clock is not None)

        def turn(*keys):
            answers, done = [], threading.Event()

            def cb(outcome, lease, exc):
                answers.append((outcome, lease))
                if len(answers) == len(keys):
                    done.set()
            for key in keys:
                leases.acquire(key, b'{}', cb)
            return answers, done
        answers, done = turn('r0', 'r1')
        scheduled.pop()()
        assert done.wait(10)
        first = {lease.key: lease for _, lease in answers}
        writes0 = leases.stats['create_batches'] + leases.stats['delete_batches']

        # One turn: r0 ends (its key taken again at once) and r2 starts.
        assert leases.release(first['r0'], with_turn=True)
        answers, done = turn('r0', 'r2')
        assert len(scheduled) == 1, 'the release and the creates go out together'
        scheduled.pop()()
        assert done.wait(10)
        assert sorted(o for o, _ in answers) == [LeaseOutcome.ACQUIRED] * 2, answers
        assert leases.stats['deletes_with_creates'] == 1
        assert leases.stats['create_batches'] + leases.stats['delete_batches'] == writes0 + 1
        again = {lease.key: lease for _, lease in answers}
        _, stat = observer.get(again['r0'].path)
        assert stat.czxid == again['r0'].token > first['r0'].token

        # r1 ends in a turn whose create meets a key held by someone else: the
        # multi does nothing, so the release goes out alone and r1's node goes.
        observer.create(leases.path_for('elsewhere'), b'', makepath=True)
        assert leases.release(first['r1'], with_turn=True)
        answers, done = turn('elsewhere')
        scheduled.pop()()
        assert done.wait(10)
        assert answers[0][0] == LeaseOutcome.CONTENDED
        assert wait_for(lambda: observer.exists(first['r1'].path) is None), 'release lost'
        assert observer.exists(again['r0'].path) is not None

        # A release asked for in a turn whose batch never runs (the consumer
        # stopped) goes out when the holders pause.
        assert leases.release(again['r2'], with_turn=True)
        leases.creates.flush_deletes()
        assert wait_for(lambda: observer.exists(again['r2'].path) is None)
    finally:
        leases.close()


def test_a_next_slot_asked_for_under_a_session_given_up_is_not_created_on_the_next(
        make_leases, namespace):
    """A semaphore's next-slot create (or a batch fallback) runs on kazoo's thread
    after an answer: if the session was given up and replaced meanwhile, creating it
    on the new session would leave a node nobody tracks (the key stays held)."""
    leases = make_leases(on_lost=lambda lost, wait_until: None)
    old = leases.session_id
    leases._give_up()  # the session deadline passed: closed and replaced
    assert wait_for(lambda: leases.connected and leases.session_id not in (None, old), 20)
    answers = []
    leases.creates.try_create(['k-1'], 0, b'{}', lambda *a: answers.append(a), 'req', old)
    assert wait_for(lambda: answers)
    assert answers[0][0] == LeaseOutcome.UNAVAILABLE
    time.sleep(0.3)  # a create, had one been sent, is applied by now
    assert leases.client.exists(f'{namespace}/k-1') is None, 'created under the new session'


def test_semaphore_watches_do_not_pile_up_and_a_known_full_one_costs_no_round_trip(
        make_leases, observer, namespace):
    holder, waiter = make_leases(), make_leases()
    slots = ['sem-0', 'sem-1']
    held = {s: acquire(holder, s)[1] for s in slots}
    assert all(held.values())
    assert acquire(waiter, slots)[0] == LeaseOutcome.CONTENDED
    woken = []
    event = threading.Event()

    def wake():
        woken.append(1)
        event.set()
    # As the gate does: one watch at a time, again after every wake-up. sem-1 stays
    # held throughout; sem-0 changes hands 30 times.
    for round_ in range(30):
        event.clear()
        exists = waiter.stats['watches']
        waiter.watch(slots, wake)
        assert wait_for(lambda: all(waiter.watches.known_held(waiter.path_for(s))
                                    for s in slots)), 'watches not armed'
        # Only the slot freed since is asked again; the held one's watch stands.
        assert waiter.stats['watches'] - exists == (2 if round_ == 0 else 1)
        creates = waiter.stats['creates']
        assert acquire(waiter, slots)[0] == LeaseOutcome.CONTENDED
        assert waiter.stats['creates'] == creates, 'a known-full semaphore was asked again'
        holder.release(held['sem-0'])
        assert event.wait(10), 'not woken when a slot was freed'
        outcome, lease = acquire(holder, 'sem-0')
        assert outcome == LeaseOutcome.ACQUIRED
        held['sem-0'] = lease
    assert len(woken) == 30
    assert len(waiter.watches) == 0  # each waiter left both nodes when woken
    # The long-held slot frees: one call for the one waiter, not one per retry.
    event.clear()
    waiter.watch(slots, wake)
    assert wait_for(lambda: waiter.watches.known_held(waiter.path_for('sem-1')))
    holder.release(held['sem-1'])
    assert event.wait(10)
    time.sleep(0.3)
    assert len(woken) == 31
    assert acquire(waiter, slots)[0] == LeaseOutcome.ACQUIRED
