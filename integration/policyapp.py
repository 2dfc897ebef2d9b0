"""The test app with the contention policies of issue 13 (wait deadlines,
coalesce, ...): the test app's tasks plus these, in a module of their own so
the other tests' workers never load them (``mutex_wait_timeout`` refuses
``mutex_park=False``, which some of those tests run with)."""
import time

from integration.testapp import app, record

__all__ = ('app',)


@app.task(bind=True, mutex_keys=('key',), mutex_wait_timeout=1.5)
def impatient(self, key, duration=0.0, seq=None):
    """Waits at most 1.5 s for its key."""
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_name='ledger', mutex_keys=('account',), mutex_wait_timeout=1.0)
def ledger_impatient(self, account, duration=0.0, seq=None):
    """Shares the mutex ``ledger`` with :func:`ledger_patient`; waits at most 1 s."""
    record(self, 'start', f'ledger/{account}', seq=seq)
    time.sleep(duration)
    record(self, 'end', f'ledger/{account}', seq=seq)
    return seq


@app.task(bind=True, mutex_name='ledger', mutex_keys=('account',))
def ledger_patient(self, account, duration=0.0, seq=None):
    record(self, 'start', f'ledger/{account}', seq=seq)
    time.sleep(duration)
    record(self, 'end', f'ledger/{account}', seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_contended='coalesce')
def refresh(self, key, duration=0.0, seq=None):
    """One running, one waiting per key: a newer call replaces the waiting one."""
    record(self, 'start', key, seq=seq)
    time.sleep(duration)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_name='accounts', mutex_keys=('account',),
          mutex_contended='coalesce')
def refresh_account(self, account, duration=0.0, seq=None):
    record(self, 'start', f'accounts/{account}', seq=seq)
    time.sleep(duration)
    record(self, 'end', f'accounts/{account}', seq=seq)
    return seq


@app.task(bind=True, mutex_keys=('key',), mutex_contended='replace')
def recompute(self, key, duration=0.0, seq=None):
    """The newest call wins: it stops an older running holder. Records a tick
    every 20 ms, so a test sees when a stopped holder last ran."""
    record(self, 'start', key, seq=seq)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        time.sleep(0.02)
        record(self, 'tick', key, seq=seq)
    record(self, 'end', key, seq=seq)
    return seq


@app.task(bind=True, mutex_name='book', mutex_keys=('account',), mutex_shared=True)
def read_book(self, account, duration=0.0, seq=None):
    """A reader of mutex ``book``: readers of one account run together."""
    record(self, 'start', f'book/{account}', seq=seq, shared=True)
    time.sleep(duration)
    record(self, 'end', f'book/{account}', seq=seq, shared=True)
    return seq


@app.task(bind=True, mutex_name='book', mutex_keys=('account',))
def write_book(self, account, duration=0.0, seq=None):
    """An exclusive holder of mutex ``book``: alone, with no reader."""
    record(self, 'start', f'book/{account}', seq=seq, shared=False)
    time.sleep(duration)
    record(self, 'end', f'book/{account}', seq=seq, shared=False)
    return seq
