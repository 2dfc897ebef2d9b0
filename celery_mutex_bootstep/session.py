"""The session deadline: when this worker must assume its leases are gone.

ZooKeeper expires a session once the negotiated timeout has passed since the
ensemble last heard from the client, and frees its lease nodes at once. The
client only learns of it (kazoo's LOST) when it reaches a server again, which
during a partition may be never. So the step keeps its own deadline:

    deadline = send time of the last heartbeat that got an answer
               + negotiated session timeout - margin

The heartbeat is a ``sync``, which a follower forwards to the leader, so a
follower cut off from its leader cannot keep answering it. The margin covers
the time to kill the holders and the slack in the server's session tracking.
At the deadline the session is treated as lost, before another worker can
acquire: holders are stopped and the session is closed and replaced. The
deadline thread fires at the deadline itself (not at the next heartbeat) and
runs the stop itself: it never waits on the consumer's event loop, which does
not run while the consumer reconnects to the broker.

The margin must cover one heartbeat interval (the deadline only moves when a
heartbeat is answered) plus :data:`KILL_ALLOWANCE`, the time to kill the
holders and see them gone, and stay below the timeout. It is checked against
the negotiated timeout on every connect (the server may clamp the requested
one); a margin outside those bounds is corrected with a WARNING naming
``mutex_session_margin``.

kazoo does not expose the negotiated timeout; it is read from the connection
handshake (``_connect`` returns the read timeout, two thirds of it).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from .validity import SharedValidity

__all__ = ('SessionDeadline', 'KILL_ALLOWANCE', 'default_margin')

logger = logging.getLogger(__name__)

#: Seconds allowed to SIGKILL the holders and see their processes gone.
KILL_ALLOWANCE = 0.25


def heartbeat_interval(timeout: float) -> float:
    return min(2.0, max(0.1, timeout / 8))


def default_margin(timeout: float) -> float:
    return max(0.5, 0.25 * timeout, heartbeat_interval(timeout) + KILL_ALLOWANCE)


class SessionDeadline:
    """Heartbeat and deadline for one kazoo client (its own daemon thread)."""

    def __init__(self, client: Any, path: str, requested_timeout: float, *,
                 margin: Optional[float] = None,
                 on_deadline: Callable[[], None],
                 session_id: Callable[[], Optional[int]] = lambda: None) -> None:
        self.client = client
        self.path = path
        self.requested_timeout = requested_timeout
        self.negotiated_timeout = requested_timeout
        self._margin = margin
        self.on_deadline = on_deadline
        self.last_ack: Optional[float] = None  # monotonic send time
        self.connect_sent_at: Optional[float] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._session_id = session_id
        self._margin_warned: Optional[tuple] = None
        self.validity = SharedValidity()
        self._capture_negotiated_timeout()

    @property
    def margin(self) -> float:
        timeout = self.negotiated_timeout
        if self._margin is None:
            return default_margin(timeout)
        lowest = self.interval + KILL_ALLOWANCE
        if lowest <= self._margin < timeout:
            return self._margin
        corrected = default_margin(timeout)
        if self._margin_warned != (self._margin, timeout):
            self._margin_warned = (self._margin, timeout)
            logger.warning(
                'mutex: mutex_session_margin %gs does not fit the negotiated session '
                'timeout %gs (it must be at least the heartbeat interval %gs plus %gs to '
                'kill the holders, and below the timeout); using %gs', self._margin,
                timeout, self.interval, KILL_ALLOWANCE, corrected)
        return corrected

    @property
    def interval(self) -> float:
        return heartbeat_interval(self.negotiated_timeout)

    def _capture_negotiated_timeout(self) -> None:
        connection = getattr(self.client, '_connection', None)
        connect = getattr(connection, '_connect', None)
        if connect is None:  # a kazoo without it: keep the requested value
            return

        def _connect(*args: Any, **kwargs: Any) -> Any:
            # The server accepted the session no earlier than the request was
            # sent: an answer that arrives late must not stretch the deadline
            # past the server's own expiry.
            self.connect_sent_at = time.monotonic()
            result = connect(*args, **kwargs)
            try:
                read_timeout_ms = result[0]
                self.negotiated_timeout = read_timeout_ms * 1.5 / 1000.0
            except Exception:
                pass
            self.margin  # checked against the negotiated timeout: warns once
            with self._lock:  # published once the session id is known (CONNECTED)
                self.last_ack = self.connect_sent_at
            return result
        connection._connect = _connect

    def acked(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` (monotonic) got an answer."""
        with self._lock:
            if self.last_ack is None or sent_at > self.last_ack:
                self.last_ack = sent_at
            self.validity.publish(self._session_id(), self.deadline())

    def reset(self) -> None:
        """No deadline until the next answer; pool processes refuse to start
        guarded tasks from now on."""
        with self._lock:
            self.last_ack = None
            self.validity.invalidate()

    def deadline(self) -> Optional[float]:
        last = self.last_ack
        if last is None:
            return None
        return last + self.negotiated_timeout - self.margin

    def valid(self) -> bool:
        deadline = self.deadline()
        return deadline is not None and time.monotonic() < deadline

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name='mutex-session-heartbeat', daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self.validity.close()

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._stop.is_set():
            now = time.monotonic()
            deadline = self.deadline()
            wait = next_beat - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            if wait > 0 and self._stop.wait(wait):
                return
            try:
                deadline = self.deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    self.reset()
                    self.on_deadline()  # stops the holders, on this thread
                elif time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    self._beat()
            except Exception:
                logger.exception('mutex: session heartbeat failed')

    def _beat(self) -> None:
        if self.client.connected:
            sent_at = time.monotonic()
            try:
                result = self.client.sync_async(self.path)
            except Exception:
                return

            def answered(result: Any) -> None:
                try:
                    result.get_nowait()
                except Exception:
                    return
                self.acked(sent_at)
            result.rawlink(answered)
