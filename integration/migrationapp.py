"""The Celery app for the migration and event tests: the older libraries' task bases.

Tasks written as celery_mutex and zkcelery users write them (``base=MutexTask``
with ``mutex_keys`` / ``mutex_timeout`` / ``mutex_requeue``; ``base=LockTask``
with ``self.lock()`` / ``self.semaphore()``), plus plain guarded tasks for the
event tests. Every execution appends a JSON record to a Redis list (the format
integration/records.py reads). Configured by environment variables like
integration/testapp.py; ``TEST_ZOOKEEPER_HOSTS`` and ``TEST_MUTEX_TIMEOUT`` set
the older libraries' ``ZOOKEEPER_HOSTS`` and ``MUTEX_TIMEOUT``.
"""
import os
import time


from celery_mutex_bootstep import install
from integration.recording import make_app, record as _record
from celery_mutex_bootstep.migration import LockTask, MutexTask, lock_session

RECORDS = os.environ.get('TEST_RECORDS', 'mutex-migration:records')

app = make_app('migrationapp', queue='mutex-migration', namespace='/celery-mutex-migration')
# The older libraries' settings, as their users have them.
if os.environ.get('TEST_ZOOKEEPER_HOSTS'):
    app.conf.ZOOKEEPER_HOSTS = os.environ['TEST_ZOOKEEPER_HOSTS']
if os.environ.get('TEST_MUTEX_TIMEOUT'):
    app.conf.MUTEX_TIMEOUT = int(os.environ['TEST_MUTEX_TIMEOUT'])
install(app)

def record(task, phase, key, **extra):
    _record(RECORDS, task, phase, key, **extra)


def lease_timeout(task):
    return (getattr(task.request, 'mutex_lease', None) or {}).get('timeout')


# --- celery_mutex / zkcelery MutexTask -------------------------------------------------

@app.task(base=MutexTask, bind=True, mutex_keys=('a',), mutex_timeout=30)
def refined(self, a, b, duration=0.0):
    """celery_mutex's example: one run at a time per value of ``a``."""
    record(self, 'start', f'refined/{a}')
    time.sleep(duration)
    record(self, 'end', f'refined/{a}')
    return [a + b, lease_timeout(self)]


@app.task(base=MutexTask, bind=True, mutex_keys=('server_name',), mutex_requeue=True)
def requeued(self, server_name, data=None, duration=0.0):
    """zkcelery's example with ``mutex_requeue=True``: waits instead of being dropped."""
    record(self, 'start', f'requeued/{server_name}', data=data)
    time.sleep(duration)
    record(self, 'end', f'requeued/{server_name}', data=data)
    return data


@app.task(base=MutexTask, bind=True)
def whole(self, duration=0.0):
    """No mutex_keys: one mutex for the whole task; MUTEX_TIMEOUT from the config."""
    record(self, 'start', 'whole')
    time.sleep(duration)
    record(self, 'end', 'whole')
    return lease_timeout(self)


# --- zkcelery LockTask -----------------------------------------------------------------

@app.task(base=LockTask, bind=True)
def locked(self, ref, duration=0.0, seq=None):
    """Non-blocking ``self.lock(ref)``: records whether it got the lock."""
    with self.lock(ref) as acquired:
        record(self, 'start', f'lock/{ref}', acquired=acquired, seq=seq)
        if acquired:
            time.sleep(duration)
        record(self, 'end', f'lock/{ref}', acquired=acquired, seq=seq)
    return acquired


@app.task(base=LockTask, bind=True)
def locked_retry(self, ref, duration=0.0):
    """``self.lock(ref, retry=True, countdown=..., max_retries=...)``."""
    with self.lock(ref, retry=True, countdown=0.2, max_retries=50):
        record(self, 'start', f'lock/{ref}')
        time.sleep(duration)
        record(self, 'end', f'lock/{ref}')
    return self.request.retries


@app.task(base=LockTask, bind=True)
def locked_blocking(self, ref, duration=0.0, timeout=20):
    """``self.lock(ref, blocking=True, timeout=...)``: waits for the lock."""
    with self.lock(ref, blocking=True, retry=True, timeout=timeout) as acquired:
        record(self, 'start', f'lock/{ref}', acquired=acquired)
        if acquired:
            time.sleep(duration)
        record(self, 'end', f'lock/{ref}', acquired=acquired)
    return acquired


@app.task(base=LockTask, bind=True)
def semaphored(self, ref, duration=0.0, blocking=False, seq=None):
    """``self.semaphore(ref, max_leases=2, ...)``."""
    with self.semaphore(ref, max_leases=2, blocking=blocking, timeout=30) as acquired:
        record(self, 'start', f'sem/{ref}', acquired=acquired, seq=seq)
        if acquired:
            time.sleep(duration)
        record(self, 'end', f'sem/{ref}', acquired=acquired, seq=seq)
    return acquired


@app.task(base=LockTask, bind=True)
def lock_session_of_process(self, ref, duration=0.0):
    """Take a lock, then report this pool process and its ZooKeeper session."""
    with self.lock(ref) as acquired:
        time.sleep(duration)
        session = lock_session(self.app)
        return {'pid': os.getpid(), 'session': session.session_id,
                'hosts': session.settings.hosts, 'acquired': acquired}


# --- plain guarded tasks (event tests) -------------------------------------------------

@app.task(bind=True, mutex_keys=('key',))
def work(self, key, duration=0.0, seq=None):
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_contended='skip')
def skipper(self, key, duration=0.0):
    record(self, 'start', key)
    time.sleep(duration)
    record(self, 'end', key)
