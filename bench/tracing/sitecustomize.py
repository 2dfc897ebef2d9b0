"""Handover tracing for `make bench-trace` (never installed, never in production).

On ``PYTHONPATH`` with ``MUTEX_TRACE=<dir>`` set, every Python process of the run
(the worker main processes and their pool children) imports this first. It wraps
the hand-over path of the step with timestamps (``time.time()``, comparable
across processes of one machine):

    release   a holder's lease is released (holders.Holders.release)
    send      a batch of creates and deletes goes to ZooKeeper (creates.CreateBatcher._send)
    fire      a watch fired on kazoo's thread (watches.Watches._fire)
    wake      the consumer handles it (gate.MutexGate._wake)
    answered  the consumer handles a create's answer, with its outcome
    grant     the request goes on to the pool, with its task id
    prerun / postrun   in the pool process, Celery's task signals

Main processes dump ``<pid>.json`` every 2 s and at exit; pool processes append
``pool-<pid>.txt`` lines. :mod:`bench.handover_trace` reads them.
"""
import atexit
import json
import os
import threading
import time

DIR = os.environ.get('MUTEX_TRACE')


def _install():
    from celery import signals

    from celery_mutex_bootstep import creates, gate, holders, watches

    events = []

    def dump():
        if events:
            with open(os.path.join(DIR, '%d.json' % os.getpid()), 'w') as f:
                json.dump(events, f)

    def wrap(cls, attr, name, detail=None):
        original = getattr(cls, attr)

        def traced(*args, **kwargs):
            events.append((time.time(), name, detail(*args) if detail else ''))
            return original(*args, **kwargs)
        setattr(cls, attr, traced)

    wrap(holders.Holders, 'release', 'release')
    wrap(creates.CreateBatcher, '_send', 'send')
    wrap(watches.Watches, '_fire', 'fire')
    wrap(gate.MutexGate, '_wake', 'wake')
    wrap(gate.MutexGate, '_answered', 'answered', lambda self, req, key, held, gen, outcome,
         *rest: outcome)
    wrap(gate.MutexGate, '_grant', 'grant', lambda self, req, *rest: req.id)

    def pool_mark(name):
        def mark(task_id=None, **_):
            with open(os.path.join(DIR, 'pool-%d.txt' % os.getpid()), 'a') as f:
                f.write('%f %s %s\n' % (time.time(), name, task_id))
        return mark
    signals.task_prerun.connect(pool_mark('prerun'), weak=False)
    signals.task_postrun.connect(pool_mark('postrun'), weak=False)

    def dump_every_2s():  # workers may be killed rather than stopped
        while True:
            time.sleep(2)
            dump()
    threading.Thread(target=dump_every_2s, daemon=True).start()
    atexit.register(dump)


if DIR:
    try:
        _install()
    except ImportError:  # a process without the step (the runner's helpers)
        pass
