"""The Celery app real test workers run: guarded tasks that record what they did.

Every execution appends a JSON record to a Redis list (start and end times,
pid, worker, key, fencing token), so a test can check overlaps and counts
from what actually ran. Configured by environment variables, so one module
serves every test (each with its own queue, namespace and record list).
"""
import logging
import os
import time

from celery.exceptions import Ignore, Reject
from celery.worker.control import control_command

from celery_mutex_bootstep import install
from integration.recording import flag_set, make_app, record as _record

RECORDS = os.environ.get('TEST_RECORDS', 'mutex-test:records')

app = make_app('testapp', queue='mutex-test', namespace='/celery-mutex-test')
app.conf.update(
    mutex_max_held=int(os.environ.get('TEST_MAX_HELD', '64')),
    mutex_republish_after=int(os.environ.get('TEST_REPUBLISH_AFTER', '10')),
)
if os.environ.get('TEST_PROMETHEUS_PORT'):
    app.conf.mutex_prometheus_port = int(os.environ['TEST_PROMETHEUS_PORT'])
if os.environ.get('TEST_TLS_CA'):
    app.conf.mutex_tls = {'ca': os.environ['TEST_TLS_CA'], 'verify_certs': True}
if os.environ.get('TEST_AUTH'):
    app.conf.mutex_auth = os.environ['TEST_AUTH']
if os.environ.get('TEST_QUEUE_TYPE') == 'quorum':
    from kombu import Queue
    app.conf.task_queues = [Queue(app.conf.task_default_queue, queue_arguments={
        'x-queue-type': 'quorum',
        'x-delivery-limit': int(os.environ.get('TEST_DELIVERY_LIMIT', '3'))})]
if os.environ.get('TEST_INSTALL', '1') == '1':
    install(app)
if os.environ.get('TEST_LOG_ACCEPTED') == '1':
    # An independent record of which tasks a pool process took: logged in the worker's
    # main process before Celery acknowledges an early-acked message (on_accepted),
    # so a test that SIGKILLs the worker knows which such tasks it may have taken along.
    from celery.worker.request import Request

    _on_accepted = Request.on_accepted

    def _log_accepted(self, pid, time_accepted):
        logging.getLogger('integration.testapp').warning('test: accepted %s pid %s',
                                                         self.id, pid)
        return _on_accepted(self, pid, time_accepted)

    Request.on_accepted = _log_accepted


@control_command(args=[('seconds', float)], signature='<seconds>')
def test_block_consumer(state, seconds=1.0):
    """Tests: block the worker's consumer thread (control commands run on it)."""
    time.sleep(float(seconds))
    state.consumer.app.log.get_default_logger().warning('test: consumer unblocked')
    return {'ok': 'blocked'}


def record(task, phase, key, **extra):
    _record(RECORDS, task, phase, key, **extra)


@app.task(bind=True, mutex_keys=('key',))
def work(self, key, duration=0.0, seq=None, until=None):
    """Hold ``key`` for ``duration``; with ``until`` (a key in the record store),
    only until the test sets it, at most ``duration``."""
    record(self, 'start', key, seq=seq)
    deadline = time.monotonic() + duration
    while until and time.monotonic() < deadline and not flag_set(until):
        time.sleep(0.05)
    if not until:
        time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',))
def heavy(self, key, duration=0.0, seq=None, megabytes=0):
    """work, in a pool process slow to die: a SIGKILL first frees ``megabytes`` of
    touched memory (a holder with a big heap), which takes the kernel a while."""
    ballast = b'x' * (int(megabytes) << 20)
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq if ballast is not None else None


@app.task(bind=True, mutex_keys=('key',), acks_late=True)
def work_late(self, key, duration=0.0, seq=None):
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key', 'region'))
def two_keys(self, key, region='eu', duration=0.0):
    record(self, 'start', f'{key}/{region}')
    time.sleep(duration)
    record(self, 'end', f'{key}/{region}')


@app.task(bind=True, mutex=True)
def whole(self, duration=0.0):
    record(self, 'start', 'whole')
    time.sleep(duration)
    record(self, 'end', 'whole')


@app.task(bind=True, mutex_keys=('key',))
def ends(self, key, how, duration=0.0):
    """End in a chosen way: fail, retry, reject, ignore, die, sleep (time limit)."""
    record(self, 'start', key, how=how)
    if how == 'fail':
        raise ValueError('failing on purpose')
    if how == 'retry':
        if self.request.retries == 0:
            raise self.retry(countdown=0.5, max_retries=1)
    elif how == 'reject':
        raise Reject('rejecting on purpose', requeue=False)
    elif how == 'ignore':
        raise Ignore()
    elif how == 'die':
        os._exit(3)
    elif how == 'sleep':
        time.sleep(duration)
    record(self, 'end', key, how=how)


@app.task(bind=True, mutex_keys=('key',), rate_limit='120/m')
def limited_rate(self, key, duration=0.0, seq=None):
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_contended='skip')
def skipper(self, key, duration=0.0):
    record(self, 'start', key)
    time.sleep(duration)
    record(self, 'end', key)


@app.task(bind=True, mutex_keys=('key',), mutex_requeue=False)
def legacy_skipper(self, key, duration=0.0):
    record(self, 'start', key)
    time.sleep(duration)
    record(self, 'end', key)


@app.task(bind=True, mutex_keys=('key',), mutex_limit=3)
def limited(self, key, duration=0.0, seq=None):
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_timeout=1.5)
def overrun(self, key, duration=0.0):
    record(self, 'start', key)
    time.sleep(duration)
    record(self, 'end', key)


@app.task(bind=True, mutex_keys=('key',), mutex_requeue_delay=30)
def patient(self, key, duration=0.0, seq=None):
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_name='billing', mutex_keys=('account',))
def charge(self, account, amount=0, duration=0.0):
    record(self, 'start', f'billing/{account}')
    time.sleep(duration)
    record(self, 'end', f'billing/{account}')


@app.task(bind=True, mutex_name='billing', mutex_keys=('acct',))
def refund(self, acct, duration=0.0):
    record(self, 'start', f'billing/{acct}')
    time.sleep(duration)
    record(self, 'end', f'billing/{acct}')


@app.task(bind=True)
def plain(self, n=0, duration=0.0):
    record(self, 'start', None, n=n)
    time.sleep(duration)
    record(self, 'end', None, n=n)
    return n


if os.environ.get('TEST_BAD_OPTION') == 'mutex_keys':
    @app.task(mutex_keys=('missing',))
    def misconfigured(present):
        pass


# --- fault tests (integration/test_faults.py, test_chaos.py) ---------------------------

@app.task(bind=True, mutex_keys=('key',))
def fenced(self, key, duration=0.0, seq=None):
    """Like work, and records the ZooKeeper session its lease was granted in."""
    session = (getattr(self.request, 'mutex_lease', None) or {}).get('session')
    record(self, 'start', key, seq=seq, session=session)
    time.sleep(duration)
    record(self, 'end', key, seq=seq, session=session)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_requeue_delay=30)
def fenced_patient(self, key, duration=0.0, seq=None):
    """fenced, whose contended messages wait in the worker (for the watch) for 30 s."""
    session = (getattr(self.request, 'mutex_lease', None) or {}).get('session')
    record(self, 'start', key, seq=seq, session=session)
    time.sleep(duration)
    record(self, 'end', key, seq=seq, session=session)
    return seq
