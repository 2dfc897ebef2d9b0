"""Guarded tasks in an app that never imports celery_mutex_bootstep, never calls
install() and never adds MutexStep: the step is missing altogether. Its tasks carry
the names of testapp's, so a worker that has the step can run their messages later.
Same env-driven configuration as testapp (recording.make_app)."""
import os
import time

from integration.recording import make_app, record as _record

RECORDS = os.environ.get('TEST_RECORDS', 'mutex-test:records')

app = make_app('uninstalledapp', queue='mutex-test', namespace='/celery-mutex-test')


@app.task(bind=True, name='integration.testapp.work', mutex_keys=('key',))
def work(self, key, duration=0.0, seq=None, until=None):
    _record(RECORDS, self, 'start', key, seq=seq)
    time.sleep(duration)
    _record(RECORDS, self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, name='integration.testapp.work_late', mutex_keys=('key',), acks_late=True)
def work_late(self, key, duration=0.0, seq=None):
    _record(RECORDS, self, 'start', key, seq=seq)
    time.sleep(duration)
    _record(RECORDS, self, 'end', key, seq=seq)
    return seq
