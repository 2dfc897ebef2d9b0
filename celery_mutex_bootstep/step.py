"""MutexStep: the consumer bootstep that wires the lease session and the gate."""
from __future__ import annotations

from typing import Any, Optional

from celery import bootsteps

from .control import register_control_commands
from .failclosed import guard_tasks
from .gate import MutexGate
from .policies import MutexPolicies
from .inbox import Inbox
from .lease import ZooKeeperLeases
from .metrics import start_prometheus
from .options import MutexSettings
from .security import client_options
from .waiting_summary import ConsumerGauges, waiting_gauges

__all__ = ('MutexStep',)


class MutexStep(bootsteps.StartStopStep):
    """Holds guarded tasks to a ZooKeeper lease before they reach the pool.

    Options and tasks are validated in ``__init__``, so a mistake stops the
    worker before it consumes anything. The ZooKeeper session lives from the
    first ``start`` to ``shutdown`` (after the pool has stopped, so running
    holders keep their leases to the end); a broker reconnect restarts the
    consumer but not the session.
    """

    label = 'Mutex'
    requires = ('celery.worker.consumer.tasks:Tasks',)

    def __init__(self, c: Any, mutex_hosts: Optional[str] = None,
                 mutex_session_timeout: Any = None,
                 mutex_on_session_loss: Optional[str] = None,
                 mutex_auth: Optional[str] = None, without_mutex: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        register_control_commands()  # so this worker answers mutex_leases/mutex_release
        # The tasks refuse to run without a lease, with the step or without it.
        guard_tasks(c.app)
        self.enabled = not without_mutex
        if not self.enabled:
            return
        self.settings = MutexSettings.from_app(
            c.app.conf, hosts=mutex_hosts, session_timeout=mutex_session_timeout,
            on_session_loss=mutex_on_session_loss, auth=mutex_auth)
        policies = MutexPolicies(c.app, self.settings)
        policies.validate_all()
        policies.validate_pool(c)
        # One FIFO to the consumer thread for everything from other threads.
        self.inbox = inbox = Inbox(c)
        self.leases = ZooKeeperLeases(
            self.settings.hosts, self.settings.namespace,
            session_timeout=self.settings.session_timeout,
            session_margin=self.settings.session_margin,
            client_options=client_options(self.settings.auth, self.settings.tls),
            # Acquisitions of one turn of the consumer's loop go out together.
            schedule=inbox.post,
            # kazoo's or the heartbeat's thread: through the same FIFO as the
            # answers, so a state change never overtakes an answer sent before.
            on_state=lambda state: inbox.post(self.gate.on_session, state),
            # Not through the consumer: it kills the holders on this thread.
            on_lost=lambda leases, wait_until: self.gate.on_lost(leases, wait_until))
        # Before any start: every strategy built later captures the gate.
        self.gate = MutexGate(c, self.leases, policies, self.settings, inbox)
        self.gate.install()
        c.mutex_gate = self.gate
        self.gate.metrics.gauges = ConsumerGauges(
            lambda: waiting_gauges(self.gate.room, self.gate.parked), inbox.post)

    def start(self, c: Any) -> None:
        self.leases.start()
        self.gate.start()
        port = c.app.conf.get('mutex_prometheus_port')
        if port:  # once per process; never raises
            start_prometheus(self.gate.metrics, int(port), c.hostname)

    def stop(self, c: Any) -> None:
        self.gate.stop()

    terminate = stop

    def shutdown(self, c: Any) -> None:
        if not self.enabled:
            return
        try:
            self.gate.stop()
            self.gate.holders.republisher.close()
            self.gate.verdicts.close()
            if self.gate.parked is not None:
                self.gate.parked.lot.close()
        finally:
            self.leases.close()
            self.inbox.close()

    def info(self, c: Any) -> dict:
        return {'mutex': {'hosts': self.settings.hosts,
                          'namespace': self.settings.namespace}}
