"""The demo's Celery app: one guarded task that records each of its executions.

    celery -A examples.demoapp worker --mutex-hosts zk1:2181,zk2:2181,zk3:2181

``sync_account(account, duration)`` holds the mutex of its ``account``: two
calls for one account never run at once, on any worker. Every execution
appends a start and an end record (JSON: times, worker, pid, fencing token,
whether its message had been redelivered) to a Redis list, and the worker's
consumer appends a ``received`` record for every delivery, so that
``examples.demo`` (or ``python -m examples.demoapp report``) can check from what
actually ran that no two executions of one account overlapped, and show how
long each task waited after its worker received it.

Everything is configured by environment variables (defaults: the local
services ``make demo`` uses; docker/docker-compose.yml points them at its
services):

``DEMO_BROKER``          amqp://guest:guest@127.0.0.1:5672//
``DEMO_BACKEND``         redis://127.0.0.1:6379/4   (results)
``DEMO_RECORD_URL``      the backend URL            (where records go)
``DEMO_RECORDS``         mutex-demo:records         (the record list)
``DEMO_QUEUE``           mutex-demo
``DEMO_NAMESPACE``       /celery-mutex-demo         (lease znodes)
``DEMO_LOG_CONTENDED``   1: log each contended delivery (the gate's DEBUG line)
``DEMO_UNGUARDED``       1: leave the step out (the demo's contrast run: the same
                         tasks, nothing stops two runs of one account at once)

Publish a workload and read the outcome (e.g. inside a compose container)::

    python -m examples.demoapp publish [--accounts 5] [--per-account 8]
    python -m examples.demoapp report
"""
import json
import logging
import os
import random
import socket
import time

import redis
from celery import Celery
from celery.signals import after_setup_logger, task_received

from celery_mutex_bootstep import install

BROKER = os.environ.get('DEMO_BROKER', 'amqp://guest:guest@127.0.0.1:5672//')
BACKEND = os.environ.get('DEMO_BACKEND', 'redis://127.0.0.1:6379/4')
RECORD_URL = os.environ.get('DEMO_RECORD_URL', BACKEND)
RECORDS = os.environ.get('DEMO_RECORDS', 'mutex-demo:records')
QUEUE = os.environ.get('DEMO_QUEUE', 'mutex-demo')
GUARDED = os.environ.get('DEMO_UNGUARDED', '0') != '1'

app = Celery('mutex-demo', broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    mutex_namespace=os.environ.get('DEMO_NAMESPACE', '/celery-mutex-demo'),
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
if GUARDED:
    install(app)  # the mutex step and the --mutex-hosts worker flag
else:
    # The contrast run: the same guarded tasks on purpose without the step. Without
    # this opt-out they would fail closed (refuse to run without a lease).
    app.conf.mutex_require_lease = False


@after_setup_logger.connect
def _log_contended(logger=None, **kwargs):
    # The gate logs each contended delivery at DEBUG; show those lines even
    # when the worker runs with -l INFO.
    if GUARDED and os.environ.get('DEMO_LOG_CONTENDED', '1') == '1':
        logging.getLogger('celery_mutex_bootstep.gate').setLevel(logging.DEBUG)


_redis = None


def _push(record):
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(RECORD_URL)
    _redis.rpush(RECORDS, json.dumps(record))


@task_received.connect
def _received(request=None, **kwargs):
    # Sent by the worker's consumer (main process) for every delivery, before the
    # step decides whether the task may run: from here to its start record the task
    # waited for its account (or, without the step, for a free pool process).
    if request is not None and request.task_name == sync_account.name:
        _push({'phase': 'received', 'id': request.id, 't': time.time(),
               'worker': request.hostname, 'pid': os.getpid()})


def record(task, phase, account):
    """Append one JSON record of this execution to the record list."""
    lease = getattr(task.request, 'mutex_lease', None) or {}
    delivery = task.request.delivery_info or {}
    _push({
        'phase': phase, 'task': task.name, 'id': task.request.id, 'key': account,
        't': time.time(), 'pid': os.getpid(), 'worker': task.request.hostname,
        'host': socket.gethostname(), 'token': lease.get('token'),
        'retries': task.request.retries,
        'redelivered': bool(delivery.get('redelivered')),
    })


@app.task(bind=True, name='demo.sync_account', mutex_keys=('account',), mutex_timeout=30)
def sync_account(self, account, duration):
    """Pretend to synchronise one account: nobody else may touch it meanwhile."""
    record(self, 'start', account)
    time.sleep(duration)
    record(self, 'end', account)
    lease = getattr(self.request, 'mutex_lease', None) or {}
    return {'account': account, 'token': lease.get('token')}


# --------------------------------------------------------------------------- CLI

def workload(accounts=5, per_account=8, durations=(0.2, 0.5), seed=None):
    """A shuffled list of (account, duration): ``per_account`` calls per account."""
    rng = random.Random(seed)
    calls = [('acct-%d' % (a + 1), round(rng.uniform(*durations), 3))
             for a in range(accounts) for _ in range(per_account)]
    rng.shuffle(calls)
    return calls


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog='python -m examples.demoapp')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('publish', help='send a contended workload to the queue')
    p.add_argument('--accounts', type=int, default=5)
    p.add_argument('--per-account', type=int, default=8)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--reset', action='store_true', help='clear the record list first')
    sub.add_parser('report', help='check and draw what the workers recorded')
    args = parser.parse_args(argv)

    if args.command == 'publish':
        if args.reset:
            redis.Redis.from_url(RECORD_URL).delete(RECORDS)
        calls = workload(args.accounts, args.per_account, seed=args.seed)
        for account, duration in calls:
            sync_account.apply_async((account, duration))
        print('published %d tasks on queue %s (%d accounts)' % (len(calls), QUEUE, args.accounts))
        return 0

    from celery_mutex_bootstep.testing.records import Records, overlaps
    from examples.timeline import text_timeline

    executions = Records(RECORDS, RECORD_URL, clear=False).executions()
    unfinished = [e for e in executions if e.end is None]
    found = overlaps(executions)
    print('executions: %d (unfinished: %d), distinct tasks: %d, overlaps: %d' % (
        len(executions), len(unfinished), len({e.id for e in executions}), len(found)))
    if executions:
        print(text_timeline(executions))
    return 1 if found else 0


if __name__ == '__main__':
    raise SystemExit(_main())
