"""Fail closed: a guarded task that reaches a pool without its lease does not run.

The gate stamps the lease into the request it hands to the pool
(``self.request.mutex_lease``), with its session and the path of the worker's
shared validity record (validity.py), which the heartbeat keeps current. A
task that starts when that session is no longer certainly alive (given up,
lost, or past its deadline: a frozen worker) refuses too, and the worker hands
its message back. A task that waited long for a free pool process under a
healthy session still runs. A guarded task executed by a worker whose
MutexStep is missing or disabled (``--without-mutex``) has no stamp: it logs
an ERROR, does not run its body, and goes back to the broker (rejected with
requeue under ``acks_late``, otherwise republished as a fresh copy), after a
short pause so a misconfigured worker cannot spin on it. Calls outside a
worker (``task()``, ``apply()``, eager mode) are not affected.

The check is installed by ``install(app)`` and also, for an app that never
calls it (the step missing altogether), when any worker starts in a process
where this package is imported: ``celery`` itself imports it through its
``celery.commands`` plugin entry point, so that is every worker run where the
package is installed. It happens on ``worker_init``, in the main process,
before the pool forks and before the consumer builds its task tracers (which
capture ``task.run``).

``app.conf.mutex_require_lease = False`` opts out.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

from celery import signals
from celery.exceptions import Ignore, Reject

from .options import MutexSettings, policy_for_task
from .request_end import LEASE_EXPIRED
from .validity import lease_valid

__all__ = ('guard_tasks', 'REFUSAL_PAUSE')

logger = logging.getLogger(__name__)

REFUSAL_PAUSE = 1.0


def guard_tasks(app: Any) -> None:
    """Wrap every guarded task's ``run`` with the lease check (idempotent)."""
    if not app.conf.get('mutex_require_lease', True):
        return
    settings = MutexSettings.from_app(app.conf)
    for task in list(app.tasks.values()):
        try:
            guarded = policy_for_task(task, settings) is not None
        except Exception:  # a bad option: the worker refuses to start anyway
            guarded = getattr(task, 'mutex', None) or getattr(task, 'mutex_keys', None) is not None
        if guarded:
            _guard(task)


def _guard_at_worker_init(sender: Any = None, **kwargs: Any) -> None:
    app = getattr(sender, 'app', None)
    if app is not None:
        guard_tasks(app)


signals.worker_init.connect(_guard_at_worker_init, weak=False,
                            dispatch_uid='celery_mutex_bootstep.failclosed')


def _guard(task: Any) -> None:
    run = task.run
    if getattr(run, '_mutex_guarded', False):
        return

    @functools.wraps(run)
    def run_with_lease(*args: Any, **kwargs: Any) -> Any:
        request = task.request
        if not request.called_directly and not request.is_eager:
            lease = getattr(request, 'mutex_lease', None)
            if not lease:
                _refuse(task, request, args, kwargs)
            validity = lease.get('validity')
            if validity is not None and not lease_valid(
                    validity, lease.get('session') or 0, lease.get('epoch') or 0):
                # Handed over under a session that is no longer certainly
                # alive: the worker hands the message back.
                logger.error('mutex: %s[%s] started after its lease may have expired; '
                             'refusing to run it: it goes back to the broker',
                             task.name, request.id)
                raise Reject(LEASE_EXPIRED, requeue=True)
        return run(*args, **kwargs)

    run_with_lease._mutex_guarded = True  # type: ignore[attr-defined]
    task.run = run_with_lease


def _refuse(task: Any, request: Any, args: Any, kwargs: Any) -> None:
    logger.error(
        'mutex: %s[%s] reached the pool without its lease (is MutexStep running in '
        'this worker? install(app) adds it); refusing to run it: it goes back to '
        'the broker', task.name, request.id)
    time.sleep(REFUSAL_PAUSE)
    if task.acks_late:
        raise Reject('no mutex lease', requeue=True)
    task.signature_from_request(request, args, kwargs).apply_async()
    raise Ignore()
