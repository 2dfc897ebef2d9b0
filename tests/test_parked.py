"""ParkedKeys' decisions (the broker side is proven in integration/test_hot_key.py)."""
from types import SimpleNamespace

from celery_mutex_bootstep.metrics import MutexMetrics
from celery_mutex_bootstep.parked import ParkedKeys
from celery_mutex_bootstep.parking import UNPARKED_HEADER


class FakeLot:
    def __init__(self):
        self.leases = SimpleNamespace(path_for=lambda k: '/ns/' + k)
        self.parks, self.unparks, self.registered = [], [], []

    def park(self, req, digest, origin, queue_type, done):
        self.parks.append((req, digest, origin, queue_type, done))

    def take(self, digest, queue_type, done):
        self.unparks.append((digest, done))

    def register(self, digest, paths, queue_type, mutex=None):
        self.registered.append(digest)


class Room:
    def __init__(self):
        self.counts = {}

    def __len__(self):
        return sum(self.counts.values())

    def count(self, digest):
        return self.counts.get(digest, 0)


def request(unparked=False):
    headers = {UNPARKED_HEADER: 1} if unparked else {}
    message = SimpleNamespace(headers=headers, delivery_info={'routing_key': 'q'},
                              ack_log_error=lambda *a: None,
                              reject_log_error=lambda *a, **k: None)
    return SimpleNamespace(message=message, acknowledged=False, id='t', name='task')


def make(max_held=64):
    lot, room = FakeLot(), Room()
    queues = {'q': SimpleNamespace(queue_arguments={'x-queue-type': 'quorum'})}
    consumer = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=queues)),
                               task_consumer=SimpleNamespace(queues=[], _active_tags={},
                                                             on_message=HANDED.append),
                               connection_errors=())
    later = []
    parked = ParkedKeys(consumer, lot, room, MutexMetrics(), max_held,
                        lambda d, f, *a: later.append((f, a)))
    return parked, lot, room, later


HANDED = []
KEY = SimpleNamespace(digest='d1', slots=('d1',), policy=SimpleNamespace(limit=1))


def test_the_room_keeps_limit_plus_one_per_key_then_parks():
    parked, lot, room, _ = make()
    assert not parked.should_park(request(), KEY)
    room.counts['d1'] = 2
    assert parked.should_park(request(), KEY)
    room.counts['d1'] = 1
    parked.park(request(), KEY)
    # once parked, a fresh arrival queues behind the park queue; an unparked one joins the room
    assert parked.queue_behind(request(), KEY) and parked.should_park(request(), KEY)
    assert not parked.queue_behind(request(unparked=True), KEY)
    assert not parked.should_park(request(unparked=True), KEY)
    assert lot.parks[0][2:4] == ('q', 'quorum') and lot.registered == ['d1']


def test_a_full_room_parks_even_unparked_arrivals():
    parked, _, room, _ = make(max_held=2)
    room.counts['other'] = 2
    assert parked.should_park(request(unparked=True), KEY)


def test_refill_fills_the_free_places_and_an_empty_park_queue_clears_the_flag():
    parked, lot, room, later = make()
    parked.park(request(), KEY)
    parked.refill('d1')
    assert len(lot.unparks) == 2          # limit + 1 free places
    parked.refill('d1')
    assert len(lot.unparks) == 2          # already on their way
    taken = SimpleNamespace(headers={})
    lot.unparks[0][1]('d1', taken)
    assert 'd1' in parked.flagged and parked.metrics['unparked'] == 1
    assert HANDED[-1] is taken  # delivered to this consumer, as the broker would
    lot.unparks[1][1]('d1', None)         # failed: retried later, still flagged
    assert 'd1' in parked.flagged and later
    parked.refill('d1')                   # two places again
    lot.unparks[-2][1]('d1', False)
    assert 'd1' in parked.flagged         # the other may still bring one
    lot.unparks[-1][1]('d1', False)
    assert 'd1' not in parked.flagged     # empty: the line is over
    parked.park(request(), KEY)
    assert lot.registered == ['d1', 'd1']  # registered again for the sweeps


def test_a_park_acks_the_original_only_once_confirmed_and_not_after_a_reconnect():
    parked, lot, _, _ = make()
    acked = []
    req = request()
    req.message.ack_log_error = lambda *a: acked.append(1)
    parked.park(req, KEY)
    parked.generation += 1                 # the consumer reconnected meanwhile
    lot.parks[0][4](req, True)
    assert acked == [] and not req.acknowledged
    req2 = request()
    req2.message.ack_log_error = lambda *a: acked.append(2)
    parked.park(req2, KEY)
    lot.parks[1][4](req2, True)
    assert acked == [2] and parked.metrics['parked'] == 1


def test_arrivals_still_asking_keep_their_room_places_in_arrival_order():
    # p1's first try is out; p2 is in the room: p3 must park (p1 has a place kept)...
    parked, lot, room, _ = make()
    room.counts['d1'] = 1
    assert parked.should_park(request(), KEY, asking=1)
    parked.park(request(), KEY)  # ...which flags the key
    # p1 answers "contended" after p3 parked: it is ahead of p3, so it keeps its place.
    assert not parked.should_park(request(), KEY, tried=True)
    room.counts['d1'] = 2
    assert parked.should_park(request(), KEY, tried=True)  # the room is full after all


def test_an_unparked_arrival_follows_its_line_even_when_it_runs_at_once():
    # a sweep restarted the line of a dead parker: whoever receives the message
    # goes on unparking when it takes the key, not one message per sweep
    parked, lot, _, _ = make()
    parked.arrived(request(), KEY)
    assert parked.flagged == {}
    parked.arrived(request(unparked=True), KEY)
    assert 'd1' in parked.flagged
    parked.refill('d1')
    assert [d for d, _ in lot.unparks] == ['d1', 'd1']
