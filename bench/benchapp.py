"""The Celery app the benchmark workers run (``celery -A bench.benchapp worker``).

Configured by environment variables, like integration/testapp.py, so one module
serves every benchmark phase:

``BENCH_BROKER``           broker URL (default: the local RabbitMQ)
``BENCH_QUEUE``            default queue (the runner starts workers on an idle
                           queue and adds the measured queues with add_consumer)
``BENCH_NAMESPACE``        znode under which the gate keeps its leases
``BENCH_INPOOL_NAMESPACE`` znode under which the in-pool baseline keeps its locks
``BENCH_ZK_HOSTS``         ZooKeeper hosts of the in-pool baseline (and the
                           gate's ``mutex_hosts`` unless --mutex-hosts is given)
``BENCH_RECORDS``          prefix of the Redis keys the tasks record to
``BENCH_RECORD_URL``       Redis URL of the records
``BENCH_PREFETCH``         worker_prefetch_multiplier (default 4, Celery's default)
``BENCH_REQUEUE_DELAY``    mutex_requeue_delay (unset: the product default)
``BENCH_COUNT_ENTRIES=1``  count every pool entry (task_prerun) in Redis
``BENCH_ACKS_LATE=1``      task_acks_late for every task
``BENCH_QUEUE_TYPE``       ``quorum``: the default queue is a RabbitMQ quorum queue
                           (so the worker uses per-consumer QoS, which quorum
                           queues need), with ``x-delivery-limit`` of
``BENCH_DELIVERY_LIMIT``   (default 3, as the integration tests)
``BENCH_CONTROL_EXCHANGE`` control exchange (keeps remote control private)
``BENCH_SWITCH_INTERVAL``  sys.setswitchinterval() in the worker (diagnostics only)

Records: each execution of a task body appends ONE compact JSON record to the
Redis list ``<BENCH_RECORDS>:<routing key>`` (the routing key is the queue's
name), so one worker can serve many measured queues one after the other. The
in-pool baseline appends a record to ``<BENCH_RECORDS>:<routing key>:rejects``
for every attempt that found the lock taken. With ``BENCH_COUNT_ENTRIES=1`` every pool entry (every time a
pool process starts running any of these tasks, including the baseline's
rejected attempts) increments ``<BENCH_RECORDS>:<routing key>:entries``.

Results are not stored (``task_ignore_result``): the runner reads records.

The ``bench_stats`` inspect command returns, per worker, the deliveries the
consumer saw per routing key (all, and those with ``redelivered`` set; counted
in the consumer on ``task_received``, i.e. before the mutex gate decides), the
gate's counters and whether its ZooKeeper session is connected. A parked
message taken back from its park queue (it carries ``x-mutex-origin``: handed
to the consumer, or moved to its queue by a sweep with ``x-mutex-unparked``) is
a fresh delivery of the copy, not a redelivery: it is counted apart.
"""
import json
import os
import sys
import time

import redis
from celery import Celery, signals
from celery.exceptions import Reject
from celery.worker.control import inspect_command
from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError
from kombu import Queue

from celery_mutex_bootstep import install

BROKER = os.environ.get('BENCH_BROKER', 'amqp://guest:guest@127.0.0.1:5672//')
RECORDS = os.environ.get('BENCH_RECORDS', 'bench:records')
RECORD_URL = os.environ.get('BENCH_RECORD_URL', 'redis://127.0.0.1:6379/2')
ZK_HOSTS = os.environ.get('BENCH_ZK_HOSTS', '127.0.0.1:2181')
INPOOL_NAMESPACE = os.environ.get('BENCH_INPOOL_NAMESPACE', '/celery-mutex-bench-inpool')
COUNT_ENTRIES = os.environ.get('BENCH_COUNT_ENTRIES') == '1'

app = Celery('benchapp', broker=BROKER)
app.conf.update(
    task_default_queue=os.environ.get('BENCH_QUEUE', 'celery-mutex-bench'),
    mutex_namespace=os.environ.get('BENCH_NAMESPACE', '/celery-mutex-bench'),
    mutex_hosts=ZK_HOSTS,
    worker_prefetch_multiplier=int(os.environ.get('BENCH_PREFETCH', '4')),
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)
if os.environ.get('BENCH_ACKS_LATE') == '1':
    app.conf.task_acks_late = True
if os.environ.get('BENCH_QUEUE_TYPE') == 'quorum':
    app.conf.task_queues = [Queue(app.conf.task_default_queue, queue_arguments={
        'x-queue-type': 'quorum',
        'x-delivery-limit': int(os.environ.get('BENCH_DELIVERY_LIMIT', '3'))})]
if os.environ.get('BENCH_CONTROL_EXCHANGE'):
    app.conf.control_exchange = os.environ['BENCH_CONTROL_EXCHANGE']
if os.environ.get('BENCH_REQUEUE_DELAY'):
    app.conf.mutex_requeue_delay = float(os.environ['BENCH_REQUEUE_DELAY'])
install(app)
if os.environ.get('BENCH_SWITCH_INTERVAL'):
    sys.setswitchinterval(float(os.environ['BENCH_SWITCH_INTERVAL']))

# -- records (pool processes) ----------------------------------------------

_redis = None
_redis_pid = None


def _r():
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis = redis.Redis.from_url(RECORD_URL)
        _redis_pid = os.getpid()
    return _redis


def _list(task, suffix=''):
    rk = (task.request.delivery_info or {}).get('routing_key') or 'unrouted'
    return f'{RECORDS}:{rk}{suffix}'


def _push(task, **fields):
    _r().rpush(_list(task), json.dumps(fields, separators=(',', ':')))


def _run(task, key, duration, mark):
    start = time.time()
    if mark:  # lets the runner see that the body started (hot-key row)
        _r().rpush(_list(task, ':marks'), json.dumps({'k': key, 's': start}))
    if duration:
        time.sleep(duration)
    _push(task, k=key, s=start, e=time.time(), d=duration, p=os.getpid(),
          id=task.request.id)


@signals.task_prerun.connect
def _count_entry(task=None, **_):
    if COUNT_ENTRIES:
        _r().incr(_list(task, ':entries'))


# -- the subject: guarded in the consumer by MutexStep ----------------------

@app.task(bind=True, name='bench.noop', mutex_keys=('key',))
def noop(self, key):
    _run(self, key, 0, False)


@app.task(bind=True, name='bench.sleep_guarded', mutex_keys=('key',))
def sleep_guarded(self, key, duration, mark=False):
    _run(self, key, duration, mark)


@app.task(bind=True, name='bench.sleep_guarded_fast', mutex_keys=('key',),
          mutex_requeue_delay=0.1)
def sleep_guarded_fast(self, key, duration, mark=False):
    """sleep_guarded with mutex_requeue_delay=0.1 (the product default is 1 s)."""
    _run(self, key, duration, mark)


# -- unguarded controls -------------------------------------------------------

@app.task(bind=True, name='bench.noop_plain')
def noop_plain(self, key):
    _run(self, key, 0, False)


@app.task(bind=True, name='bench.sleep_plain')
def sleep_plain(self, key, duration, mark=False):
    _run(self, key, duration, mark)


# -- the baseline: the lock taken inside the task, in the pool process --------
#
# What celery_mutex / zkcelery document: a base task that, in the pool process,
# creates an ephemeral znode for the key with a kazoo client of its own and
# deletes it when the task ends. Their documented reaction to contention is not
# to run the task; to keep every task (as the subject does) this baseline
# rejects the message back to the broker (acks_late + Reject(requeue=True)),
# which is the usual way to make those libraries "wait".

_zk = None
_zk_pid = None


def _child_zk():
    """One kazoo session per pool process, opened lazily after the fork."""
    global _zk, _zk_pid
    if _zk is None or _zk_pid != os.getpid():
        _zk = KazooClient(hosts=ZK_HOSTS, timeout=10)
        _zk.start(timeout=15)
        _zk_pid = os.getpid()
    return _zk


@app.task(bind=True, name='bench.sleep_inpool', acks_late=True)
def sleep_inpool(self, key, duration, mark=False):
    zk = _child_zk()
    path = f'{INPOOL_NAMESPACE}/{key}'
    try:
        zk.create(path, b'', ephemeral=True, makepath=True)
    except NodeExistsError:
        _r().rpush(_list(self, ':rejects'), json.dumps(
            {'k': key, 't': time.time(), 'p': os.getpid()}))
        raise Reject('mutex held', requeue=True)
    try:
        _run(self, key, duration, mark)
    finally:
        try:
            zk.delete(path)
        except NoNodeError:
            pass


# -- consumer-side counters (worker main process) ------------------------------

_deliveries = {}


@signals.task_received.connect
def _count_delivery(request=None, **_):
    info = request.delivery_info or {}
    counts = _deliveries.setdefault(info.get('routing_key'), [0, 0, 0])
    counts[0] += 1
    if info.get('redelivered'):
        counts[1] += 1
    headers = (request.message.headers or {}) if request.message else {}
    if headers.get('x-mutex-origin') or headers.get('x-mutex-unparked'):
        counts[2] += 1


@inspect_command()
def bench_stats(state):
    """Deliveries per routing key ([all, redelivered, unparked copies]), the
    mutex gate's counters and session state.

    Only the gate's public ``counters`` and ``leases.connected`` are read.
    """
    gate = getattr(state.consumer, 'mutex_gate', None)
    leases = getattr(gate, 'leases', None)
    return {
        'pid': os.getpid(),
        'deliveries': {k: list(v) for k, v in _deliveries.items()},
        'gate': dict(gate.metrics.snapshot()['counters']) if gate is not None else {},
        'connected': bool(getattr(leases, 'connected', False)),
    }
