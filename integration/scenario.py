"""One test's world: its own queue, namespace and record list, real workers on it."""
import time
import uuid
from typing import Any, Dict, List, Optional

from celery import Celery
from kazoo.client import KazooClient

from celery_mutex_bootstep.keys import key_digest

from .records import Records

APP = 'integration.testapp'
BACKEND = 'redis://127.0.0.1:6379/1'


def wait_for(predicate, timeout=30.0, interval=0.05, message='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f'timed out after {timeout}s waiting for {message}')


class Scenario:
    app_module = APP  # the Celery app the workers run

    def __init__(self, worker_factory, zk_hosts: str, broker: str, name: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.worker_factory = worker_factory
        self.zk_hosts = zk_hosts
        self.broker = broker
        self.queue = f'mt-{name}-{tag}'
        self.namespace = f'/mt-{name}-{tag}'
        self.records = Records(self.queue)
        self.client = Celery('client', broker=broker, backend=BACKEND, set_as_current=False)
        self.client.conf.task_default_queue = self.queue
        self.workers: List[Any] = []
        self.extra_queues: List[str] = []  # other queues a test used, deleted at close
        self._zk: Optional[KazooClient] = None

    def env(self, **extra: str) -> Dict[str, str]:
        env = {
            'TEST_BROKER': self.broker, 'TEST_BACKEND': BACKEND,
            'TEST_QUEUE': self.queue, 'TEST_RECORDS': self.queue,
            'TEST_NAMESPACE': self.namespace,
        }
        env.update(extra)
        return env

    def worker(self, name: str = 'w1', *, concurrency: int = 4, pool: str = 'prefork',
               hosts: Optional[str] = None, extra_args=(), env=None, wait=True,
               loglevel: str = 'INFO'):
        args = list(extra_args)
        if hosts is not False:
            args += ['--mutex-hosts', hosts or self.zk_hosts]
        w = self.worker_factory(
            self.app_module, hostname=f'{name}-{self.queue}@%h', concurrency=concurrency,
            pool=pool, extra_args=args, env=self.env(**(env or {})), loglevel=loglevel)
        if wait:
            w.wait_ready()
        self.workers.append(w)
        return w

    def send(self, task: str, *args: Any, **options: Any):
        kwargs = options.pop('kwargs', None)
        return self.client.send_task(f'{self.app_module}.{task}', args=args, kwargs=kwargs,
                                     queue=self.queue, **options)

    # -- ZooKeeper view ----------------------------------------------------

    @property
    def zk(self) -> KazooClient:
        if self._zk is None:
            self._zk = KazooClient(hosts=self.zk_hosts)
            self._zk.start(timeout=15)
        return self._zk

    def lease_path(self, task: str, *values: Any, name: Optional[str] = None) -> str:
        return f'{self.namespace}/{key_digest(name or f"{self.app_module}.{task}", values)}'

    def lease_nodes(self) -> List[str]:
        if not self.zk.exists(self.namespace):
            return []
        # '.clock-<session>' nodes belong to live sessions, not to tasks
        return [n for n in self.zk.get_children(self.namespace) if not n.startswith('.')]

    def park_queues(self) -> List[str]:
        """The park queues the workers registered in this namespace."""
        from celery_mutex_bootstep.parking import park_queue_name
        root = f'{self.namespace}/.parked'
        try:
            children = self.zk.get_children_async(root).get(timeout=5)
        except Exception:  # none registered, or the server is gone
            return []
        return [park_queue_name(self.namespace, d) for d in children]

    def close(self) -> None:
        parked = []
        if self._zk is not None:
            try:
                parked = self.park_queues() if self._zk.connected else []
            except Exception:
                pass
            self._zk.stop()
            self._zk.close()
        try:
            with self.client.connection_for_write() as conn:
                # a broker that is gone (a test's private one) is not waited for
                conn.ensure_connection(max_retries=1, timeout=5)
                conn.default_channel.queue_delete(self.queue)
                for name in parked + self.extra_queues:
                    conn.default_channel.queue_delete(name)
        except Exception:
            pass
        self.records.redis.delete(self.queue)


def nodename(worker) -> str:
    import socket
    return worker.hostname.replace('%h', socket.gethostname())


Scenario.nodename = staticmethod(nodename)
