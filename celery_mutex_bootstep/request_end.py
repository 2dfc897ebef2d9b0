"""Knowing, in the worker's main process, that a granted request has ended.

Celery reports a request's end through methods of the request object, called
on whichever thread the pool uses (prefork: the consumer's event loop; threads:
an executor thread; solo: inline). ``watch_request_end`` wraps them on the one
instance, so each end path calls back exactly as follows:

* ``ended()``: the task body has returned or never started (success, failure,
  Retry, Reject, Ignore, revoked before start);
* ``killed()``: the pool is killing or has killed the process running it
  (hard time limit, revoke with terminate, worker lost, cancel); the process
  may still be alive for a moment, so the caller waits for it to exit;
* ``started()``: the pool accepted it (``on_accepted``);
* ``refused()``: the pool process refused to run it because its lease may
  have expired (``Reject`` with :data:`LEASE_EXPIRED`), before ``ended()``.

Callbacks may come more than once (a hard time limit reports both a failure
and a timeout): the caller makes its release idempotent.

A request the step killed itself because its lease was lost (``stopped()``
is true) is not reported to Celery as a failure: Celery would store FAILURE
and acknowledge an ``acks_late`` message, while the step hands the message
back so the task runs again.
"""
from __future__ import annotations

from typing import Any, Callable

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.exceptions import Reject
from celery.worker import state as worker_state

__all__ = ('watch_request_end', 'LEASE_EXPIRED')

#: Reason of the Reject a pool process raises when its lease's session may be gone.
LEASE_EXPIRED = 'mutex lease may have expired before the task started'

# Ends after which the pool child may still be running the task.
_KILLED = (TimeLimitExceeded, WorkerLostError, Terminated)


def _exception(exc_info: Any) -> Any:
    exc = getattr(exc_info, 'exception', exc_info)
    return getattr(exc, 'exc', exc)  # ExceptionWithTraceback


def watch_request_end(req: Any, *, ended: Callable[[], None],
                      killed: Callable[[], None],
                      started: Callable[[], None],
                      refused: Callable[[], None] = lambda: None,
                      stopped: Callable[[], bool] = lambda: False) -> None:
    on_success, on_failure = req.on_success, req.on_failure
    on_timeout, on_accepted = req.on_timeout, req.on_accepted
    announce_revoked = req._announce_revoked
    announce_cancelled = req._announce_cancelled

    def on_accepted_(*args: Any, **kwargs: Any) -> Any:
        try:
            return on_accepted(*args, **kwargs)
        finally:
            started()

    def on_success_(*args: Any, **kwargs: Any) -> Any:
        try:
            return on_success(*args, **kwargs)
        finally:
            failed, retval, _ = args[0]
            killed() if failed and isinstance(_exception(retval), _KILLED) else ended()

    def on_failure_(exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        exc = _exception(exc_info)
        if isinstance(exc, _KILLED + (SystemExit,)) and stopped():
            worker_state.task_ready(req)
            return killed()
        if isinstance(exc, Reject) and getattr(exc, 'reason', None) == LEASE_EXPIRED:
            refused()
        try:
            return on_failure(exc_info, *args, **kwargs)
        finally:
            killed() if isinstance(exc, _KILLED) else ended()

    def on_timeout_(soft: bool, timeout: Any) -> Any:
        try:
            return on_timeout(soft, timeout)
        finally:
            if not soft:
                killed()

    def announce_revoked_(reason: Any, terminated: bool, *args: Any) -> Any:
        try:
            return announce_revoked(reason, terminated, *args)
        finally:
            # Not terminated and never started: nothing runs.
            killed() if terminated or req.time_start else ended()

    def announce_cancelled_(*args: Any, **kwargs: Any) -> Any:
        try:
            return announce_cancelled(*args, **kwargs)
        finally:
            killed() if req.time_start else ended()

    req.on_accepted = on_accepted_
    req.on_success = on_success_
    req.on_failure = on_failure_
    req.on_timeout = on_timeout_
    req._announce_revoked = announce_revoked_
    req._announce_cancelled = announce_cancelled_
