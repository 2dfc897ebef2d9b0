"""A small threaded TCP proxy that a test controls, to cut one client off a server.

    proxy = TcpProxy(('127.0.0.1', zk_port))   # listens on a free 127.0.0.1 port
    worker = scenario.worker('a', hosts=proxy.hosts)
    proxy.stall()     # no byte moves in either direction; no socket is closed
    proxy.resume()    # bytes flow again (what was held is delivered late)
    proxy.stall('down')  # only server -> client is held ('up': client -> server)
    proxy.sever()     # close the current connections (new ones are accepted)
    proxy.refuse()    # close the current connections and refuse new ones
    proxy.refuse(sever=False)  # keep the current ones, refuse new ones
    proxy.accept()    # accept new connections again after refuse()
    proxy.close()     # stop listening and close every connection

``stall()`` is a network partition as TCP sees it: connections stay open, new ones
are accepted (and connected upstream) but nothing is forwarded, and what the two
sides send meanwhile waits in the socket buffers until ``resume()`` or ``close()``.
A close by either side is not passed on while stalled either (it is not even read).

Only the standard library is used.
"""
import select
import socket
import threading
import time

__all__ = ['TcpProxy']

_CHUNK = 65536
_POLL = 0.1


def _directions(direction):
    if direction == 'both':
        return ('up', 'down')
    if direction in ('up', 'down'):
        return (direction,)
    raise ValueError(f"direction must be 'both', 'up' or 'down', not {direction!r}")


class _Connection:
    def __init__(self, proxy, client, upstream):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = False
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream, 'up'),
                             name='tcpproxy-up', daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client, 'down'),
                             name='tcpproxy-down', daemon=True),
        ]

    def start(self):
        for t in self.threads:
            t.start()

    def close(self):
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self.proxy._forget(self)

    def _pump(self, src, dst, direction):
        proxy = self.proxy
        try:
            while not self.closed:
                if not proxy._wait_flowing(direction, lambda: self.closed):
                    return
                try:
                    readable, _, _ = select.select([src], [], [], _POLL)
                except (OSError, ValueError):
                    return
                if not readable:
                    continue
                # stall() may have come while select() waited: read nothing then.
                if not proxy._wait_flowing(direction, lambda: self.closed):
                    return
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    return
                if not data:
                    return
                if not proxy._wait_flowing(direction, lambda: self.closed):
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return
                proxy._count(direction, len(data))
        finally:
            self.close()


class TcpProxy:
    """Forward ``listen`` (default: a free port on 127.0.0.1) to ``target``."""

    def __init__(self, target, listen=('127.0.0.1', 0), *, connect_timeout=2.0):
        self.target = (target[0], int(target[1]))
        self.connect_timeout = connect_timeout
        self._flow = {'up': threading.Event(), 'down': threading.Event()}
        for event in self._flow.values():
            event.set()
        self._closed = False
        self._refusing = False
        self.refused = 0
        self._lock = threading.Lock()
        self._connections = set()
        self.accepted = 0
        self.bytes = {'up': 0, 'down': 0}
        self.stalls = []  # [direction, start, end or None] as time.time()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        self._thread = threading.Thread(target=self._accept_loop, name='tcpproxy-accept',
                                        daemon=True)
        self._thread.start()

    @property
    def port(self):
        return self.address[1]

    @property
    def hosts(self):
        """'127.0.0.1:PORT', e.g. for --mutex-hosts."""
        return '%s:%d' % self.address

    @property
    def stalled(self):
        """True while some direction is stalled."""
        return not all(event.is_set() for event in self._flow.values())

    def connections(self):
        with self._lock:
            return len(self._connections)

    # ----------------------------------------------------------------- control
    def stall(self, direction='both'):
        """Stop moving bytes, keeping every socket open: in both directions, only
        client -> server ('up') or only server -> client ('down')."""
        for d in _directions(direction):
            if self._flow[d].is_set():
                self.stalls.append([d, time.time(), None])
                self._flow[d].clear()

    def resume(self, direction='both'):
        """Move bytes again after stall() (in both directions, 'up' or 'down')."""
        for d in _directions(direction):
            if not self._flow[d].is_set():
                for entry in reversed(self.stalls):
                    if entry[0] == d and entry[2] is None:
                        entry[2] = time.time()
                        break
                self._flow[d].set()

    def sever(self):
        """Close every current connection (both sockets) at once; the proxy keeps
        accepting new ones. Returns how many were closed."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        return len(connections)

    def refuse(self, sever=True):
        """A host whose network is down, as its clients see it: every current
        connection is closed (unless ``sever=False``) and every new one is closed as
        soon as it is accepted (nothing reaches the server), until ``accept()``.
        Returns how many were closed."""
        self._refusing = True
        return self.sever() if sever else 0

    def accept(self):
        """Forward new connections again after ``refuse()``."""
        self._refusing = False

    def close(self):
        """Stop listening and close every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for event in self._flow.values():  # release the pumps so that they see the close
            event.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        self._thread.join(2)
        for conn in connections:
            for t in conn.threads:
                t.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return '<TcpProxy %s -> %s:%d%s>' % (self.hosts, self.target[0], self.target[1],
                                            ' stalled' if self.stalled else '')

    # ----------------------------------------------------------------- internals
    def _wait_flowing(self, direction, closed):
        """Block while ``direction`` is stalled; False once the proxy or the
        connection is closed."""
        event = self._flow[direction]
        while not event.wait(_POLL):
            if self._closed or closed():
                return False
        return not (self._closed or closed())

    def _count(self, direction, n):
        with self._lock:
            self.bytes[direction] += n

    def _forget(self, conn):
        with self._lock:
            self._connections.discard(conn)

    def _accept_loop(self):
        while not self._closed:
            try:
                readable, _, _ = select.select([self._listener], [], [], _POLL)
            except (OSError, ValueError):
                return
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            if self._refusing:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: so is the connection to it
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, upstream)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
                self.accepted += 1
            conn.start()
