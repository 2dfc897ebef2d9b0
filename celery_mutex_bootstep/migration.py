"""Task bases for users of celery_mutex and zkcelery: change one import.

``MutexTask``: the older libraries' mutex task, enforced by this package's
consumer step (the task never reaches the pool while its key is held)::

    from celery_mutex_bootstep import MutexTask, install
    install(app)

    @app.task(base=MutexTask, mutex_keys=('a',), mutex_timeout=30)
    def my_task(a, b): ...

It reads the options those users know: ``mutex_keys`` (argument names whose
values refine the mutex; without them the whole task is one mutex),
``mutex_timeout`` (else app config ``MUTEX_TIMEOUT``, else one hour) and
``mutex_requeue``; app config ``ZOOKEEPER_HOSTS`` names the ensemble when
neither ``--mutex-hosts`` nor ``mutex_hosts`` is set. Like those libraries
it drops a call whose mutex is held, but visibly: the task FAILS with
:class:`~celery_mutex_bootstep.exceptions.MutexContended` in its result, a
WARNING is logged and a ``mutex-skipped`` event sent. With
``mutex_requeue=True`` (or ``mutex_contended='requeue'``) the call waits in
the consumer and runs once the key is free instead. Every other option of
the step (``mutex_name``, ``mutex_limit``, ``mutex_requeue_delay``) works
too.

``LockTask``: zkcelery's locks taken inside the task body (in the pool
process), non-blocking by default::

    @app.task(base=LockTask, bind=True)
    def sync(self, account):
        with self.lock(account) as acquired:
            if acquired:
                ...
        with self.lock(account, retry=True, countdown=5, max_retries=10):
            ...                                   # retried until it gets it
        with self.semaphore(max_leases=2, blocking=True, timeout=30) as acquired:
            ...

``lock(*refinements, blocking=False, retry=False, **retry_kwargs)`` yields
whether the lock was acquired. The lock is named by the task name and the
refinements (JSON values; hashed, so slashes and unicode are safe). With
``retry=True`` a lock not acquired calls ``self.retry(**retry_kwargs)``.
``blocking=True`` waits for it instead (``retry`` is then forced off), for
at most ``timeout`` seconds if ``timeout`` is among the keyword arguments
(it is never passed on to ``retry``), and yields False when that time runs
out. ``semaphore(*refinements,
max_leases=N, ...)`` is the same with N holders at once (the first caller
fixes N for a name; a different N raises ``ValueError`` until the
semaphore's node is removed).

These locks are kazoo's Lock and Semaphore recipes under
``<mutex_namespace>/locks`` (``lock-<key>``, ``semaphore-<key>``), on one
ZooKeeper session per pool process, opened on first use after the fork
(never one inherited from another process) and closed when the process
exits. Hosts, session timeout and credentials come from the worker's
``--mutex-*`` flags, then the app config, as for the step. Unlike the step's
leases they are taken in the pool: a contended task has already used its
pool slot. When ZooKeeper is unreachable a non-blocking acquire yields False
(with a WARNING) after at most about two session timeouts; so does any
acquire when no session can be opened within one session timeout. A
contender node a failed acquire or release may have left (its reply lost
with the connection, or ZooKeeper unreachable at release) is deleted once
the session reconnects, so it cannot block the lock for the rest of the
session (kazoo #732). If the session expires while a lock is held the lock
is gone (an ERROR is logged); the task body is not interrupted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from celery import Task, signals
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import ConnectionLoss, KazooException, LockTimeout, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.recipe.lock import Lock, Semaphore
from kazoo.retry import KazooRetry

from .keys import key_digest
from .options import MutexSettings
from .security import client_options

__all__ = ('MutexTask', 'LockTask', 'LOCKS_NODE', 'ZooKeeperUnavailable')

logger = logging.getLogger(__name__)
kazoo_logger = logging.getLogger('celery_mutex_bootstep.kazoo')

LOCKS_NODE = 'locks'
_HOST = socket.gethostname()
_VALUE_CHARS = 200
# A semaphore's guard lock is held for a few round trips by whoever takes or
# checks a lease; a non-blocking acquire waits this long for it at most.
_GUARD_WAIT = 2.0


# =========================================================================== MutexTask

class MutexTask(Task):
    """celery_mutex / zkcelery ``MutexTask``, enforced in the consumer.

    Guarded even without ``mutex_keys`` (one mutex for the whole task). A
    contended call is dropped visibly (FAILURE with MutexContended) unless
    the task sets ``mutex_requeue=True`` or ``mutex_contended='requeue'``.
    """

    mutex = True
    mutex_keys = None
    mutex_timeout = None
    mutex_contended = 'skip'
    mutex_requeue = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The option a subclass (or ``@app.task(base=MutexTask, ...)``) sets
        # itself wins over the one it inherits: ``mutex_requeue=True`` must
        # mean requeue, not contradict the inherited ``mutex_contended='skip'``.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if own.get('mutex_requeue') is not None and 'mutex_contended' not in own:
            cls.mutex_contended = None
        elif own.get('mutex_contended') is not None and 'mutex_requeue' not in own:
            cls.mutex_requeue = None


# =========================================================================== LockTask

class ZooKeeperUnavailable(KazooException):
    """An acquire gave up: ZooKeeper did not answer in time."""


def _require_connection(client: KazooClient) -> None:
    """kazoo queues a request made while disconnected until it reconnects, so a
    synchronous call would wait for the end of the outage: fail it now instead
    (kazoo's retry treats ConnectionLoss as retryable)."""
    if not client.connected:
        raise ConnectionLoss('not connected to ZooKeeper')


class _Orphans:
    """Contender nodes a failed acquire or release may have left: (parent, prefix)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Set[Tuple[str, str]] = set()

    def add(self, parent: str, prefix: str) -> None:
        with self._lock:
            self._items.add((parent, prefix))

    def discard(self, parent: str, prefix: str) -> None:
        with self._lock:
            self._items.discard((parent, prefix))

    def snapshot(self) -> List[Tuple[str, str]]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _owed(path: str, exc: BaseException) -> None:
    logger.warning('mutex: could not release %s (%r): it is released when the '
                   'ZooKeeper session reconnects, or vanishes if the session expires',
                   path, exc)


class _Lock(Lock):
    """kazoo's Lock that remembers a contender node it could not delete."""

    def __init__(self, client: KazooClient, path: str, identifier: str,
                 orphans: _Orphans, give_up_after: Optional[float] = None) -> None:
        super().__init__(client, path, identifier)
        self._orphans = orphans
        # kazoo retries a lost connection forever, backing off up to a minute;
        # back off up to a second, and give up after ``give_up_after`` seconds.
        self._retry = KazooRetry(max_tries=None, max_delay=1.0,
                                 sleep_func=client.handler.sleep_func)
        self._give_up_at = (None if give_up_after is None
                            else time.monotonic() + give_up_after)
        self._tries = 0

    def _inner_acquire(self, blocking: bool, timeout: Optional[float],
                       ephemeral: bool = True) -> bool:
        # Called again by kazoo's retry after each lost connection.
        self._tries += 1
        if (self._tries > 1 and self._give_up_at is not None
                and time.monotonic() > self._give_up_at):
            raise ZooKeeperUnavailable(f'gave up acquiring {self.path}: no answer from '
                                       f'ZooKeeper')
        _require_connection(self.client)
        return super()._inner_acquire(blocking, timeout, ephemeral)

    def _best_effort_cleanup(self) -> None:
        try:
            if self.node is None and not self.create_tried:
                return
            _require_connection(self.client)
            node = self.node or self._find_node()
            if node:
                self._delete_node(node)
        except NoNodeError:
            pass
        except KazooException:
            # The create may have succeeded (or the delete not): find the node
            # by our unique prefix once the session is back.
            self._orphans.add(self.path, self.prefix)

    def release(self) -> bool:
        try:
            if self.is_acquired:
                _require_connection(self.client)
            return super().release()
        except KazooException as exc:
            self._orphans.add(self.path, self.prefix)
            self.is_acquired = False
            _owed(self.path, exc)
            return False


class _Semaphore(Semaphore):
    """kazoo's Semaphore with two fixes.

    * A non-blocking acquire waits (briefly) for the guard lock every
      contender holds while it checks the leases, instead of failing while
      leases are free because another caller is checking at that moment.
    * Lease and guard nodes it could not delete are remembered for removal.
    """

    def __init__(self, client: KazooClient, path: str, identifier: str,
                 max_leases: int, orphans: _Orphans,
                 guard_wait: float = _GUARD_WAIT) -> None:
        super().__init__(client, path, identifier, max_leases=max_leases)
        self._orphans = orphans
        self._guard_wait = guard_wait

    def _inner_acquire(self, blocking: bool, timeout: Optional[float] = None) -> bool:
        _require_connection(self.client)
        self._session_expired = False
        self.client.add_listener(self._watch_session)
        if not self.assured_path:
            self._ensure_path()
        if self.client.exists(self.create_path):
            return True
        start = time.monotonic()

        def left() -> Optional[float]:
            return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))

        guard = _Lock(self.client, self.lock_path, self.data, self._orphans)
        try:
            guarded = guard.acquire(blocking=True,
                                    timeout=left() if blocking else self._guard_wait)
        except LockTimeout:
            guarded = False
        if not guarded:
            if blocking:
                raise LockTimeout(f'no lease of semaphore {self.path} after {timeout} seconds')
            return False
        try:
            while True:
                self.wake_event.clear()
                if self._get_lease():
                    return True
                if not blocking:
                    return False
                self.wake_event.wait(left())
                if not self.wake_event.is_set():
                    raise LockTimeout(f'no lease of semaphore {self.path} '
                                      f'after {timeout} seconds')
        finally:
            guard.release()

    def _best_effort_cleanup(self) -> None:
        try:
            _require_connection(self.client)
            self.client.delete(self.create_path)
        except NoNodeError:
            pass
        except KazooException:
            parent, _, name = self.create_path.rpartition('/')
            self._orphans.add(parent, name)

    def release(self) -> bool:
        try:
            if self.is_acquired:
                _require_connection(self.client)
            return super().release()
        except KazooException as exc:
            parent, _, name = self.create_path.rpartition('/')
            self._orphans.add(parent, name)
            self.is_acquired = False
            _owed(self.path, exc)
            return False

    def forget(self) -> None:
        """Drop the session listener kazoo leaves registered (one per acquire)."""
        self.client.remove_listener(self._watch_session)


class LockSession:
    """The ZooKeeper session of one process for LockTask's locks."""

    def __init__(self, settings: MutexSettings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.orphans = _Orphans()
        self._start_lock = threading.Lock()
        self._held_lock = threading.Lock()
        self._held = 0
        self.client: Optional[KazooClient] = None

    def _new_client(self) -> KazooClient:
        timeout = self.settings.session_timeout
        client = KazooClient(
            hosts=self.settings.hosts, timeout=timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0),
            # A command never waits for a lost connection much longer than the
            # session could survive it.
            command_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0,
                                     deadline=timeout),
            logger=kazoo_logger,
            **client_options(self.settings.auth, self.settings.tls))
        client.add_listener(self._on_state)
        return client

    def start(self, wait: Optional[float] = None) -> KazooClient:
        """The started client, waiting at most ``wait`` seconds (default: the
        session timeout) for a connection; raises KazooTimeoutError when a new
        client cannot connect in that time."""
        if wait is None:
            wait = self.settings.session_timeout
        with self._start_lock:
            if self.pid != os.getpid():
                raise RuntimeError('LockSession used in a process it was not created in')
            client = self.client
            if client is not None and client.connected:
                return client
            if client is None:
                client = self.client = self._new_client()
                try:
                    client.start(timeout=max(wait, 0.1))
                except Exception:
                    self.client = None  # kazoo stopped and closed it: a new one next time
                    raise
                return client
        # Started earlier and disconnected now: kazoo reconnects on its own.
        deadline = time.monotonic() + wait
        while not client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        return client

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None and self.pid == os.getpid():
            try:
                client.stop()
                client.close()
            except Exception:  # pragma: no cover - exit path
                pass

    @property
    def session_id(self) -> Optional[int]:
        client = self.client
        return client.client_id[0] if client is not None and client.client_id else None

    # -- state ---------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        # kazoo's thread: no blocking calls here.
        if state == KazooState.LOST:
            self.orphans.clear()  # ephemeral nodes are gone with the session
            with self._held_lock:
                held = self._held
            if held:
                logger.error('mutex: the ZooKeeper session of pool process %s expired '
                             'while %d lock(s) of LockTask were held: they are released '
                             'and the tasks holding them no longer exclude others',
                             os.getpid(), held)
        elif state == KazooState.CONNECTED and len(self.orphans) and self.client is not None:
            self.client.handler.spawn(self.sweep)

    def held(self, delta: int) -> None:
        with self._held_lock:
            self._held += delta

    def sweep(self) -> None:
        """Delete contender nodes left by failed acquires or releases."""
        client = self.client
        if client is None or not client.connected:
            return
        for parent, prefix in self.orphans.snapshot():
            try:
                for child in client.get_children(parent):
                    if child.startswith(prefix):
                        try:
                            client.delete(f'{parent}/{child}')
                        except NoNodeError:
                            pass
                        logger.info('mutex: deleted %s/%s, left by a lock acquire or '
                                    'release that could not reach ZooKeeper', parent, child)
            except NoNodeError:
                pass
            except KazooException:
                continue  # still unreachable: the next CONNECTED tries again
            self.orphans.discard(parent, prefix)


# One session per process and connection settings; created lazily, never
# inherited across a fork.
_sessions: Dict[tuple, LockSession] = {}
_sessions_pid: Optional[int] = None
_sessions_lock = threading.Lock()
_inherited: List[LockSession] = []  # another process's clients: kept, never used


def _reset_after_fork() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # it may have been held by a thread at fork time


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _worker_flags(app: Any) -> dict:
    return getattr(app, '_mutex_worker_flags', None) or {}


def lock_settings(app: Any) -> MutexSettings:
    """Worker flags (seen by the main process before the fork), then app config."""
    flags = _worker_flags(app)
    return MutexSettings.from_app(
        app.conf, hosts=flags.get('mutex_hosts'),
        session_timeout=flags.get('mutex_session_timeout'),
        auth=flags.get('mutex_auth'))


def _session_key(settings: MutexSettings) -> tuple:
    tls = None if settings.tls is None else tuple(sorted(
        (k, repr(v)) for k, v in settings.tls.items()))
    return (settings.hosts, settings.session_timeout, settings.auth, tls)


def lock_session(app: Any) -> LockSession:
    """This process's session for ``app``'s lock settings (created on first use)."""
    global _sessions_pid
    settings = lock_settings(app)
    key = _session_key(settings)
    pid = os.getpid()
    with _sessions_lock:
        if _sessions_pid != pid:
            _inherited.extend(_sessions.values())
            _sessions.clear()
            _sessions_pid = pid
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = LockSession(settings)
    return session


def close_lock_sessions() -> None:
    """Close this process's sessions (their lock nodes vanish at once)."""
    with _sessions_lock:
        mine = list(_sessions.values()) if _sessions_pid == os.getpid() else []
        _sessions.clear()
    for session in mine:
        session.close()


@signals.celeryd_init.connect(weak=False)
def _remember_worker_flags(sender: Any = None, instance: Any = None,
                           options: Any = None, **kwargs: Any) -> None:
    """The worker's ``--mutex-*`` flags, for the pool processes forked later."""
    app = getattr(instance, 'app', None)
    if app is None or not options:
        return
    app._mutex_worker_flags = {
        name: options.get(name) for name in
        ('mutex_hosts', 'mutex_session_timeout', 'mutex_auth')
        if options.get(name) is not None}


@signals.worker_process_shutdown.connect(weak=False)  # a prefork pool process
@signals.worker_shutdown.connect(weak=False)  # the worker (solo and threads pools)
def _close_on_process_exit(**kwargs: Any) -> None:
    close_lock_sessions()


def _short(value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + '...'


class LockTask(Task):
    """zkcelery's ``LockTask``: ``self.lock()`` / ``self.semaphore()`` in the task body."""

    def lock(self, *refinements: Any, blocking: bool = False, retry: bool = False,
             **retry_kwargs: Any) -> 'contextlib.AbstractContextManager[bool]':
        """Context manager yielding whether the lock named by the task and
        ``refinements`` was acquired; see the module documentation."""
        return self._hold('lock', refinements, 1, blocking, retry, retry_kwargs)

    def semaphore(self, *refinements: Any, max_leases: int = 1, blocking: bool = False,
                  retry: bool = False,
                  **retry_kwargs: Any) -> 'contextlib.AbstractContextManager[bool]':
        """Like :meth:`lock`, with ``max_leases`` holders at once."""
        if isinstance(max_leases, bool) or not isinstance(max_leases, int) or max_leases < 1:
            raise ValueError(f'task {self.name!r}: max_leases must be an integer >= 1, '
                             f'got {max_leases!r}')
        return self._hold('semaphore', refinements, max_leases, blocking, retry, retry_kwargs)

    def lock_path(self, *refinements: Any, kind: str = 'lock') -> str:
        """The znode of the lock (``kind='lock'``) or semaphore named by ``refinements``."""
        settings = lock_settings(self.app)
        return _lock_path(settings, kind, self.name, refinements)

    @contextlib.contextmanager
    def _hold(self, kind: str, refinements: tuple, max_leases: int, blocking: bool,
              retry: bool, retry_kwargs: dict) -> Iterator[bool]:
        if blocking:
            retry = False
        retry_kwargs = dict(retry_kwargs)
        wait = retry_kwargs.pop('timeout', None)  # only for blocking=True
        session = lock_session(self.app)
        path = _lock_path(session.settings, kind, self.name, refinements)
        identifier = self._identifier(refinements, session.settings)
        recipe, acquired = _acquire(session, kind, path, identifier, max_leases,
                                    blocking, wait if blocking else None, self.name)
        try:
            if not acquired and retry:
                raise self.retry(**retry_kwargs)
            if acquired:
                session.held(1)
                try:
                    yield True
                finally:
                    session.held(-1)
                    recipe.release()
            else:
                yield False
        finally:
            if isinstance(recipe, _Semaphore):
                recipe.forget()

    def _identifier(self, refinements: tuple, settings: MutexSettings) -> str:
        request = self.request
        data = {'task': self.name, 'task_id': request.id, 'host': _HOST,
                'pid': os.getpid(), 'worker': request.hostname,
                'acquired_at': round(time.time(), 3)}
        if settings.store_values:
            data['values'] = [_short(v) for v in refinements]
        return json.dumps(data, separators=(',', ':'), default=repr)


def _lock_path(settings: MutexSettings, kind: str, name: str, refinements: tuple) -> str:
    digest = key_digest(name, list(refinements), task=name)
    return f'{settings.namespace}/{LOCKS_NODE}/{kind}-{digest}'


def _acquire(session: LockSession, kind: str, path: str, identifier: str,
             max_leases: int, blocking: bool, wait: Optional[float],
             task: str) -> Tuple[Any, bool]:
    """(recipe, acquired); ZooKeeper trouble gives not acquired, with a WARNING."""
    recipe: Any = None
    # Without blocking, ZooKeeper gets one session timeout to connect and answer.
    give_up_at = time.monotonic() + session.settings.session_timeout
    try:
        client = session.start()
        if len(session.orphans):
            session.sweep()
        if kind == 'lock':
            recipe = _Lock(client, path, identifier, session.orphans, give_up_after=(
                None if blocking else max(0.0, give_up_at - time.monotonic())))
            acquired = recipe.acquire(blocking=blocking, timeout=wait)
        else:
            recipe = _Semaphore(client, path, identifier, max_leases, session.orphans)
            acquired = recipe.acquire(blocking=blocking, timeout=wait)
        return recipe, bool(acquired)
    except LockTimeout:  # blocking with a timeout that ran out
        return recipe, False
    except (KazooException, KazooTimeoutError) as exc:
        logger.warning('mutex: %s could not take %s %s: ZooKeeper (%s) did not answer '
                       '(%r); not acquired', task, kind, path, session.settings.hosts, exc)
        return recipe, False
    except BaseException:
        if isinstance(recipe, _Semaphore):
            recipe.forget()
        raise
