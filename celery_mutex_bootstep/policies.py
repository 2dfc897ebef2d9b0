"""Which tasks are guarded: task name -> validated :class:`~.options.MutexPolicy`.

Validated once when the worker starts (a mistake stops the worker with a message
naming the task and the option) and looked up on every request by the gate.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .exceptions import MutexConfigError
from .options import MutexPolicy, MutexSettings, policy_for_task

__all__ = ('MutexPolicies', 'check_combination')


def check_combination(task: Any, policy: MutexPolicy, settings: MutexSettings) -> None:
    """Refuse option combinations the gate cannot honour, naming task and option."""
    def bad(problem: str) -> MutexConfigError:
        return MutexConfigError(f'task {policy.task!r}: {problem}')

    if policy.contended in ('coalesce', 'replace') and policy.limit > 1:
        raise bad(f"option mutex_contended={policy.contended!r} keeps one running and one "
                  f"waiting per key: it makes no sense with mutex_limit={policy.limit}")
    if policy.shared and policy.limit > 1:
        raise bad(f'option mutex_shared=True makes no sense with mutex_limit={policy.limit} '
                  f'(readers share one key; a semaphore counts holders)')
    if policy.shared and policy.contended in ('coalesce', 'replace'):
        raise bad(f'option mutex_shared=True makes no sense with mutex_contended='
                  f'{policy.contended!r} (readers run together: none replaces another)')
    explicit_wait = getattr(task, 'mutex_wait_timeout', None) is not None
    if policy.wait_timeout is not None and (explicit_wait or policy.contended != 'skip'):
        if policy.contended == 'skip':
            raise bad("option mutex_wait_timeout makes no sense with "
                      "mutex_contended='skip' (a skipped call never waits)")
        if not settings.park:
            # Without parking a waiter cycles through its queue as the same
            # message, which carries no record of when it first waited: the
            # wait would restart on every delivery and never reach its deadline.
            source = 'option' if explicit_wait else 'app config'
            raise bad(f'{source} mutex_wait_timeout needs mutex_park=True (a requeued '
                      f'message carries no record of how long it waited)')


class MutexPolicies:
    """Task name -> validated policy, or None for unguarded tasks."""

    def __init__(self, app: Any, settings: MutexSettings) -> None:
        self.app = app
        self.settings = settings
        self._policies: Dict[str, Optional[MutexPolicy]] = {}
        #: mutex names some task reads (``mutex_shared``): their exclusive
        #: waiters mark themselves so new readers wait (:mod:`.shared`).
        self.shared_names: set = set()

    def validate_all(self) -> None:
        """Check every registered task; raises MutexConfigError on a mistake."""
        for name, task in sorted(self.app.tasks.items()):
            self._policies[name] = policy = policy_for_task(task, self.settings)
            if policy is not None:
                check_combination(task, policy, self.settings)
        self._check_shared_names()
        self.shared_names = {p.name for p in self._policies.values() if p and p.shared}

    def _check_shared_names(self) -> None:
        """Tasks sharing a ``mutex_name`` must agree on its limit: a limit of 1
        and of N name their nodes differently (``<key>`` against
        ``<key>-0..N-1``) and would never see each other's holders."""
        by_name: Dict[str, MutexPolicy] = {}
        for policy in self._policies.values():
            if policy is None:
                continue
            other = by_name.setdefault(policy.name, policy)
            one_waiting = ('coalesce', 'replace')
            if other.contended != policy.contended and (
                    other.contended in one_waiting or policy.contended in one_waiting):
                # One waiter per key: a 'coalesce' call would supersede another
                # task's waiter that asked to wait its turn.
                raise MutexConfigError(
                    f'tasks {other.task!r} and {policy.task!r} share mutex_name '
                    f'{policy.name!r} with mutex_contended {other.contended!r} and '
                    f'{policy.contended!r}: with coalesce or replace, give them one '
                    f'mutex_contended, or different mutex_name')
            if other.limit != policy.limit:
                raise MutexConfigError(
                    f'tasks {other.task!r} and {policy.task!r} share mutex_name '
                    f'{policy.name!r} with different mutex_limit ({other.limit} and '
                    f'{policy.limit}): give them one limit, or different mutex_name')

    def validate_pool(self, consumer: Any) -> None:
        """Guarded tasks need a pool whose tasks the worker can kill when their
        lease is lost (prefork): threads, solo and green pools run tasks in the
        worker's own process, so a task would run on without its lease. Those
        pools need ``mutex_on_session_loss='continue'``, which says so."""
        pool_cls = getattr(getattr(consumer, 'controller', None), 'pool_cls', None)
        pool = getattr(consumer, 'pool', None)
        module = getattr(pool_cls, '__module__', None) or type(pool).__module__
        if module.endswith('.prefork') or module.startswith('unittest'):
            return
        replacing = sorted(n for n, p in self._policies.items()
                           if p is not None and p.contended == 'replace')
        if replacing:  # whatever mutex_on_session_loss says: replacing *is* stopping
            raise MutexConfigError(
                f"task {replacing[0]!r}: option mutex_contended='replace' stops the running "
                f"holder, which pool {module.rsplit('.', 1)[-1]!r} cannot do (it runs tasks "
                f"in the worker process): use the prefork pool")
        if self.settings.on_session_loss == 'continue':
            return
        guarded = sorted(n for n, p in self._policies.items() if p is not None)
        if guarded:
            raise MutexConfigError(
                f'pool {module.rsplit(".", 1)[-1]!r} cannot stop a task whose lease is lost '
                f'(it runs tasks in the worker process), so guarded tasks '
                f'({", ".join(guarded[:3])}{", ..." if len(guarded) > 3 else ""}) would run '
                f'on without exclusivity: use the prefork pool, or set '
                f'mutex_on_session_loss=continue (--mutex-on-session-loss continue) to accept that')

    def get(self, name: str) -> Optional[MutexPolicy]:
        try:
            return self._policies[name]
        except KeyError:
            policy = policy_for_task(self.app.tasks[name], self.settings)
            self._policies[name] = policy
            return policy
