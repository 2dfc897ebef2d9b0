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
acquire: holders are stopped and the session is closed and replaced.

kazoo does not expose the negotiated timeout; it is read from the connection
handshake (``_connect`` returns the read timeout, two thirds of it).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

__all__ = ('SessionDeadline',)

logger = logging.getLogger(__name__)


class SessionDeadline:
    """Heartbeat and deadline for one kazoo client (its own daemon thread)."""

    def __init__(self, client: Any, path: str, requested_timeout: float, *,
                 margin: Optional[float] = None,
                 on_deadline: Callable[[], None]) -> None:
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
        self._capture_negotiated_timeout()

    @property
    def margin(self) -> float:
        if self._margin is not None:
            return self._margin
        return max(0.5, 0.25 * self.negotiated_timeout)

    @property
    def interval(self) -> float:
        return min(2.0, max(0.1, self.negotiated_timeout / 8))

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
            self.acked(self.connect_sent_at)
            return result
        connection._connect = _connect

    def acked(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` (monotonic) got an answer."""
        with self._lock:
            if self.last_ack is None or sent_at > self.last_ack:
                self.last_ack = sent_at

    def reset(self) -> None:
        with self._lock:
            self.last_ack = None

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

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:
                logger.exception('mutex: session heartbeat failed')

    def _beat(self) -> None:
        deadline = self.deadline()
        if deadline is not None and time.monotonic() >= deadline:
            self.reset()
            self.on_deadline()
            return
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
