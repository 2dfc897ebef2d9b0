"""Benchmarks: the consumer gate (subject) against an in-pool lock (baseline).

    python -m bench.run            # full run, ~8-10 minutes; writes bench/results.md
    python -m bench.run --quick    # smoke test, about a minute; writes bench/results-quick.md
    python -m bench.run --rows 5,6 # only these rows; writes bench/results-partial.md
    python -m bench.run --profile  # also py-spy the worker's main process (needs py-spy)

Everything runs on this machine: a private ZooKeeper (integration.zkserver), the
local RabbitMQ (broker; rows 5c: Redis) and Redis (execution records), and real prefork
``celery worker`` processes running bench/benchapp.py. Every run uses its own
queues, exchanges, znodes and Redis keys (tagged with a random run id) and
removes them, its workers and its ZooKeeper at the end, also on error or
Ctrl-C. See bench/README.md for the method.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from importlib import metadata

import psutil
import redis
from celery import Celery
from kazoo.client import KazooClient
from kombu import Exchange, Queue

from celery_mutex_bootstep.keys import key_digest
from celery_mutex_bootstep.parking import park_queue_name
from bench import hotkey, pyspy
from bench.measure import (CLK_TCK, SECTION, BenchError, fmt, fmt_range, log, machine_cpu,
                           median, pct, pids_named, proc_cpu, thread_cpu, tree_cpu)
from integration import brokers, zkserver
from integration.workers import start_worker

APP = 'bench.benchapp'
RECORD_URL = 'redis://127.0.0.1:6379/2'
# Redis as broker (hot-key rows): a db of its own (the tests' broker is db 3)
REDIS_BROKER_URL = 'redis://127.0.0.1:6379/5'
UNGUARDED = ('noop_plain', 'sleep_plain', 'sleep_inpool')
HERE = os.path.dirname(os.path.abspath(__file__))

FULL = dict(
    reps=5,                 # measured repetitions of each uncontended phase
    noop_n=2000, noop_warmup=200,
    sleep_n=500, sleep_d=0.01, sleep_warmup=50,
    keys=4, per_key=20, dur=0.1, contended_reps=3,
    backlog=200, backlog_dur=0.02, backlog_reps=3,
    hold=5.0, waiters=1000,
    behind_hot=5000, behind_others=40, behind_dur=0.02, behind_reps=1, behind_cap=30.0,
    spread_keys=8, spread_per_key=10, spread_dur=0.1, spread_reps=3,
)
QUICK = dict(
    reps=1,
    noop_n=300, noop_warmup=50,
    sleep_n=100, sleep_d=0.01, sleep_warmup=20,
    keys=2, per_key=6, dur=0.1, contended_reps=1,
    backlog=40, backlog_dur=0.02, backlog_reps=1,
    hold=2.0, waiters=200,
    behind_hot=300, behind_others=10, behind_dur=0.02, behind_reps=1, behind_cap=2.0,
    spread_keys=8, spread_per_key=3, spread_dur=0.1, spread_reps=1,
)


# --rows selects these groups; a row id names its group (1b and 4 come with 1)
ROW_GROUPS = ('1', '2', '2c', '3', '5', '6')
ROW_ALIASES = {'1b': '1', '4': '1', '2b': '2', '2d': '2c', '3b': '3', '5b': '5', '5c': '5'}


# --------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, params, quick):
        self.p = params
        self.quick = quick
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = 'bench-%s' % self.run_id
        self.namespace = '/%s' % self.prefix
        self.inpool_namespace = '/%s-inpool' % self.prefix
        self.records = 'bench:%s' % self.run_id
        self.control_exchange = 'bench-%s-ctl' % self.run_id
        self.idle_queue = '%s-idle' % self.prefix
        self.log_dir = tempfile.mkdtemp(prefix='celery-mutex-bench-')
        self.queues = {}            # broker URL -> queue names this run declared
        self.clients = {}           # broker URL -> Celery client
        self.contended = Counter()  # (broker, task, key) published, guarded tasks only
        self.entities = {}          # queue name -> Queue, for queues with arguments
        self.workers = []
        self.zk = None
        self.kz = None
        self.client = None
        self.redis = None
        self.broker = None
        self.redis_broker = REDIS_BROKER_URL
        self.versions = {}
        self.notes = []
        self.rabbit_pids = []
        self.redis_pids = []

    # -- setup / cleanup ----------------------------------------------------

    def setup(self):
        log('run %s: starting ZooKeeper, checking RabbitMQ and Redis' % self.run_id)
        self.broker = brokers.ensure_rabbitmq()
        brokers.ensure_redis()
        self.zk = zkserver.standalone()
        self.redis = redis.Redis.from_url(RECORD_URL)
        self.client = self.client_for(self.broker)
        self.queues[self.broker].append(self.idle_queue)
        self.kz = KazooClient(hosts=self.zk.hosts)
        self.kz.start(timeout=15)
        self.kz.ensure_path(self.namespace)
        self.kz.ensure_path(self.inpool_namespace)
        self._collect_versions()
        self.rabbit_pids = pids_named('beam.smp')
        self.redis_pids = pids_named('redis-server')

    def cleanup(self, keep_logs=False):
        for w in self.workers:
            try:
                if not getattr(w, 'stopping', False):
                    w.terminate()
            except Exception:
                pass
        for w in self.workers:
            try:
                if getattr(w, 'stopping', False):  # a second SIGTERM would interrupt it
                    try:
                        w.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        pass  # stop() kills it
                w.stop(timeout=20)
            except Exception as exc:
                log('could not stop worker %s: %r' % (w.hostname, exc))
        for broker, client in self.clients.items():
            # the park queues of every key that may have waited (product keeps them)
            parked = sorted({self.park_queue(task, key, broker)
                             for (b, task, key), n in self.contended.items()
                             if b == broker and n > 1})
            try:
                with client.connection_for_write() as conn:
                    ch = conn.default_channel
                    ops = [(op, q) for q in self.queues.get(broker, ())
                           for op in ('queue_delete', 'exchange_delete')]
                    ops += [('queue_delete', q) for q in parked]
                    # remote control's exchanges (kombu leaves them behind)
                    ops += [('exchange_delete', '%s.pidbox' % self.control_exchange),
                            ('exchange_delete', 'reply.%s.pidbox' % self.control_exchange)]
                    for op, name in ops:
                        try:
                            getattr(ch, op)(name)
                        except Exception:
                            ch = conn.channel()  # a failed op closes the channel
            except Exception as exc:
                log('could not delete the queues on %s: %r' % (broker.split('@')[-1], exc))
        if REDIS_BROKER_URL in self.clients:
            self._clean_redis_broker()
        if self.redis is not None:
            try:
                keys = list(self.redis.scan_iter(match=self.records + ':*', count=1000))
                if keys:
                    self.redis.delete(*keys)
            except Exception as exc:
                log('could not delete the Redis records: %r' % (exc,))
        if self.kz is not None:
            try:
                self.kz.stop()
                self.kz.close()
            except Exception:
                pass
        if self.zk is not None:
            self.zk.close()
        if keep_logs:
            log('worker logs kept in %s' % self.log_dir)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _clean_redis_broker(self):
        """What kombu leaves in the Redis broker db: only keys named after this run
        (queues, bindings, pidbox replies) or this run's namespace (park queues)."""
        try:
            r = redis.Redis.from_url(REDIS_BROKER_URL)
            space = park_queue_name(self.namespace_for(REDIS_BROKER_URL), 'x')[:-1]
            keys = set(r.scan_iter(match='*%s*' % self.prefix, count=1000))
            keys |= set(r.scan_iter(match='*%s*' % space, count=1000))
            if keys:
                r.delete(*keys)
            # kombu's shared index of binding expiries: only this run's members
            mine = [m for m in r.zrange('_kombu.binding_deadlines', 0, -1)
                    if self.prefix.encode() in m]
            if mine:
                r.zrem('_kombu.binding_deadlines', *mine)
        except Exception as exc:
            log('could not delete the Redis broker keys: %r' % (exc,))

    def client_for(self, broker):
        if broker not in self.clients:
            client = Celery('bench-client', broker=broker, set_as_current=False)
            client.conf.control_exchange = self.control_exchange
            client.conf.broker_connection_retry_on_startup = True
            client.bench_broker = broker
            self.clients[broker] = client
            self.queues.setdefault(broker, [])
        return self.clients[broker]

    def _collect_versions(self):
        v = self.versions
        v['python'] = platform.python_version()
        for dist in ('celery', 'kombu', 'billiard', 'kazoo', 'redis'):
            try:
                v[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                v[dist] = '?'
        srvr = self.zk.four_letter('srvr')
        line = next((l for l in srvr.splitlines() if l.startswith('Zookeeper version:')), '')
        v['zookeeper'] = line.split(':', 1)[-1].strip().split('-')[0].split(',')[0] or '?'
        try:
            with self.client.connection_for_write() as conn:
                conn.ensure_connection(max_retries=3)
                props = conn.connection.server_properties or {}
                ver = props.get('version', '?')
                v['rabbitmq'] = ver.decode() if isinstance(ver, bytes) else str(ver)
        except Exception:
            v['rabbitmq'] = '?'
        try:
            v['redis-server'] = self.redis.info('server').get('redis_version', '?')
        except Exception:
            v['redis-server'] = '?'

    # -- workers -------------------------------------------------------------

    def env(self, broker=None, idle=None, **extra):
        env = {
            'BENCH_BROKER': broker or self.broker,
            'BENCH_QUEUE': idle or self.idle_queue,
            'BENCH_NAMESPACE': self.namespace_for(broker or self.broker),
            'BENCH_INPOOL_NAMESPACE': self.inpool_namespace,
            'BENCH_ZK_HOSTS': self.zk.hosts,
            'BENCH_RECORDS': self.records,
            'BENCH_RECORD_URL': RECORD_URL,
            'BENCH_CONTROL_EXCHANGE': self.control_exchange,
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start_workers(self, names, concurrency, broker=None, idle=None, **env):
        """Start workers (in parallel) on the idle queue (*idle*, default the run's
        one, on *broker*, default RabbitMQ); wait until each answers bench_stats
        with its ZooKeeper session connected."""
        broker = broker or self.broker
        client = self.client_for(broker)
        if idle and idle not in self.queues[broker]:
            self.queues[broker].append(idle)
        started = []
        for name in names:
            w = start_worker(
                APP, hostname='%s-%s@%%h' % (name, self.run_id), concurrency=concurrency,
                extra_args=['--mutex-hosts', self.zk.hosts, '-Q', idle or self.idle_queue],
                env=self.env(broker, idle, **env), loglevel='WARNING', log_dir=self.log_dir)
            w.node = '%s-%s@%s' % (name, self.run_id, socket.gethostname())
            w.client, w.concurrency = client, concurrency
            self.workers.append(w)
            started.append(w)
        for w in started:
            deadline = time.monotonic() + 90
            while True:
                if not w.is_running():
                    raise BenchError('worker %s exited (rc=%s):\n%s' % (
                        w.node, w.returncode, w.log_tail(40)))
                st = self.stats(w)
                if st and st.get('connected'):
                    break
                if st and 'error' in st:
                    raise BenchError('worker %s: bench_stats failed: %s' % (w.node, st['error']))
                if time.monotonic() > deadline:
                    raise BenchError('worker %s not ready (stats %r):\n%s' % (
                        w.node, st, w.log_tail(40)))
                time.sleep(0.2)
        return started

    def stop_workers(self, workers):
        """Warm-stop workers a row no longer needs, so they are off the cores. Not
        waited for: Celery's warm shutdown of even an idle prefork worker takes
        seconds (waiting on its pool), which would only add to the run; cleanup()
        reaps them."""
        for w in workers:
            w.terminate()
            w.stopping = True

    def stats(self, worker, tries=1):
        for _ in range(tries):
            replies = worker.client.control.broadcast(
                'bench_stats', destination=[worker.node], reply=True, timeout=1.0) or []
            for item in replies:
                if worker.node in item:
                    return item[worker.node]
        return None

    def must_stats(self, worker):
        st = self.stats(worker, tries=5)
        if st is None:
            raise BenchError('worker %s does not answer bench_stats' % worker.node)
        return st

    # -- queues, publishing, records -------------------------------------------

    def new_queue(self, tag, client=None, arguments=None):
        """Declare a fresh queue (``arguments``: e.g. a quorum queue's)."""
        client = client or self.client
        names = self.queues[client.bench_broker]
        name = '%s-%s' % (self.prefix, tag)
        if name in names:
            name = '%s-%d' % (name, len(names))
        queue = Queue(name, Exchange(name, 'direct'), routing_key=name, queue_arguments=arguments)
        with client.connection_for_write() as conn:
            queue(conn.default_channel).declare()
        names.append(name)
        if arguments:  # publish to the entity, or the client declares it without them
            self.entities[name] = queue
        return name

    def publish(self, queue, task, arglist, kwargs=None, client=None):
        client = client or self.client
        if task not in UNGUARDED:  # keys that may wait have park queues to delete
            broker = client.bench_broker
            self.contended.update((broker, task, args[0]) for args in arglist)
        with client.producer_or_acquire() as producer:
            for args in arglist:
                client.send_task('bench.' + task, args=args, kwargs=kwargs,
                                 queue=self.entities.get(queue, queue), producer=producer)

    def consume(self, queue, workers, on=True, arguments=None):
        """add_consumer (with the queue's ``arguments``, which the worker declares it
        with) or cancel_consumer, on every worker, until each has answered."""
        nodes = [w.node for w in workers]
        ctl = workers[0].client.control
        fun = ctl.add_consumer if on else ctl.cancel_consumer
        extra = {'options': {'queue_arguments': arguments}} if on and arguments else {}
        for _ in range(5):
            replies = fun(queue, destination=nodes, reply=True, timeout=3.0, **extra) or []
            answered = {n for r in replies for n in r}
            if answered >= set(nodes):
                return
            nodes = [n for n in nodes if n not in answered]
        raise BenchError('%s_consumer %s: no reply from %s' % (
            'add' if on else 'cancel', queue, nodes))

    def runs(self, queue):
        return [json.loads(x) for x in self.redis.lrange('%s:%s' % (self.records, queue), 0, -1)]

    def count(self, queue, suffix=''):
        key = '%s:%s%s' % (self.records, queue, suffix)
        if suffix == ':entries':
            return int(self.redis.get(key) or 0)
        return self.redis.llen(key)

    def wait_runs(self, queue, n, workers, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.count(queue) >= n:
                return self.runs(queue)
            for w in workers:
                if not w.is_running():
                    raise BenchError('worker %s died:\n%s' % (w.node, w.log_tail(40)))
            if time.monotonic() > deadline:
                raise BenchError('%s: %d of %d executions after %.0f s' % (
                    queue, self.count(queue), n, timeout))
            time.sleep(0.02)

    def namespace_for(self, broker):
        """The gate's namespace on *broker*'s workers: one per broker, because the
        park-queue registry in ZooKeeper is per namespace and a worker's sweep
        looks for a registered park queue on its own broker (declaring it there)."""
        return self.namespace if broker == self.broker else '%s-%s' % (
            self.namespace, broker.split(':', 1)[0])

    def park_queue(self, task, key, broker=None):
        return park_queue_name(self.namespace_for(broker or self.broker),
                               key_digest('bench.' + task, [key]))

    def quiesce(self, queue, workers, park=(), timeout=30.0):
        """After cancel_consumer, without draining a backlog: purge the queue and
        the park queues until nothing moves for half a second (no purged message,
        no new record, gate counters still), so the next phase starts clean.

        Prefetched messages and room waiters still finish or park, and the gate
        keeps unparking into the queue meanwhile: hence the loop.
        """
        client = workers[0].client
        deadline = time.monotonic() + timeout
        last, quiet_since = None, None
        with client.connection_for_write() as conn:
            ch = conn.channel()
            while True:
                purged = 0
                for name in [queue] + list(park):
                    try:
                        purged += ch.queue_purge(name) or 0
                    except Exception:  # a park queue never declared: closes the channel
                        ch = conn.channel()
                gate = [sorted(self.must_stats(w)['gate'].items()) for w in workers]
                state = (self.count(queue), self.count(queue, ':rejects'), gate)
                now = time.monotonic()
                if purged or state != last:
                    quiet_since = now
                elif now - quiet_since >= 0.5:
                    return
                last = state
                if now > deadline:
                    self.notes.append('%s: still moving %.0f s after it stopped being consumed'
                                      % (queue, timeout))
                    return
                time.sleep(0.2)

    # -- ZooKeeper counters -------------------------------------------------------

    def zk_snapshot(self):
        m = self.zk.mntr()
        return {
            'recv': m.get('zk_packets_received'),
            'sent': m.get('zk_packets_sent'),
            'writes': m.get('zk_cnt_updatelatency'),
            'write_ms': m.get('zk_sum_updatelatency'),
            'reads': m.get('zk_cnt_readlatency'),
            'cversion': self.kz.exists(self.namespace).cversion,
            'inpool_cversion': self.kz.exists(self.inpool_namespace).cversion,
            'cpu': proc_cpu(self.zk.pid),
        }

    def zk_settle(self, timeout=5.0):
        """Wait until the namespaces' cversions stop moving (releases are async)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            cur = (self.kz.exists(self.namespace).cversion,
                   self.kz.exists(self.inpool_namespace).cversion)
            if cur == last:
                return
            last = cur
            time.sleep(0.15)

    @staticmethod
    def zk_delta(a, b):
        return {k: (b[k] - a[k]) if (a[k] is not None and b[k] is not None) else None
                for k in a}

    # -- row 1: uncontended drain ------------------------------------------------

    def drain_phase(self, worker, task, n, tag, duration=None):
        q = self.new_queue(tag)
        args = [(('%s-%d' % (tag, i)),) if duration is None else ('%s-%d' % (tag, i), duration)
                for i in range(n)]
        self.publish(q, task, args)
        st0 = self.must_stats(worker)
        zk0 = self.zk_snapshot()
        cpu0, main0, wall0 = tree_cpu(worker), proc_cpu(worker.pid), time.monotonic()
        mt0 = thread_cpu(worker.pid, worker.pid)
        mach0, svc0 = machine_cpu(), self.services_cpu()
        self.consume(q, [worker])
        runs = self.wait_runs(q, n, [worker], timeout=60 + n * 0.05)
        wall1 = time.monotonic()
        cpu1, main1 = tree_cpu(worker), proc_cpu(worker.pid)
        mt1 = thread_cpu(worker.pid, worker.pid)
        mach1, svc1 = machine_cpu(), self.services_cpu()
        self.zk_settle()
        zk1 = self.zk_snapshot()
        self.consume(q, [worker], on=False)
        st1 = self.must_stats(worker)
        drain = max(r['e'] for r in runs) - min(r['s'] for r in runs)
        gate = {k: st1['gate'][k] - st0['gate'].get(k, 0) for k in st1['gate']}
        if task in ('noop', 'sleep_guarded') and (
                gate.get('acquired') != n or gate.get('contended') or gate.get('unavailable')):
            self.notes.append('%s: gate counters %r for %d unique keys' % (tag, gate, n))
        return {
            'drain': drain, 'n': n, 'tree_cpu': cpu1 - cpu0, 'main_cpu': main1 - main0,
            'main_thread_cpu': mt1 - mt0,
            'window': wall1 - wall0, 'zk': self.zk_delta(zk0, zk1), 'gate': gate,
            'executions': len(runs), 'machine_cpu': mach1 - mach0,
            'services_cpu': {k: svc1[k] - svc0[k] for k in svc0},
        }

    def services_cpu(self):
        """CPU seconds so far of the shared broker and record store (all their pids)."""
        return {'rabbitmq': sum(proc_cpu(pid) for pid in self.rabbit_pids),
                'redis': sum(proc_cpu(pid) for pid in self.redis_pids)}

    def row_uncontended(self):
        p = self.p
        log('row 1: uncontended drain, 1 worker -c 2')
        (w,) = self.start_workers(['u1'], concurrency=2)
        self.u_worker = w
        variants = [('noop_plain', 'plain'), ('noop', 'gate'), ('sleep_inpool', 'inpool')]
        sleepers = [('sleep_plain', 'plain'), ('sleep_guarded', 'gate'),
                    ('sleep_inpool', 'inpool')]
        # warm-up (discarded): pool children imported, the in-pool children opened
        # their kazoo sessions, the gate's session is connected
        for task, label in variants:
            self.drain_phase(w, task, p['noop_warmup'], 'warm-noop-%s' % label,
                             duration=0 if task == 'sleep_inpool' else None)
        for task, label in sleepers:
            self.drain_phase(w, task, p['sleep_warmup'], 'warm-sleep-%s' % label,
                             duration=p['sleep_d'])
        out = {'noop': {l: [] for _, l in variants}, 'sleep': {l: [] for _, l in sleepers}}
        for rep in range(p['reps']):
            # rotate the order so that no variant always runs first
            order = variants[rep % 3:] + variants[:rep % 3]
            for task, label in order:
                r = self.drain_phase(w, task, p['noop_n'], 'noop-%s-r%d' % (label, rep),
                                     duration=0 if task == 'sleep_inpool' else None)
                out['noop'][label].append(r)
                log('  noop  %-6s rep %d: %.2f s for %d tasks' % (label, rep, r['drain'], r['n']))
            order = sleepers[rep % 3:] + sleepers[:rep % 3]
            for task, label in order:
                r = self.drain_phase(w, task, p['sleep_n'], 'sleep-%s-r%d' % (label, rep),
                                     duration=p['sleep_d'])
                out['sleep'][label].append(r)
                log('  sleep %-6s rep %d: %.2f s for %d tasks' % (label, rep, r['drain'], r['n']))
        return out

    # -- row 2: contended keys ----------------------------------------------------

    def contended_phase(self, workers, task, tag, keys=None, per_key=None, dur=None):
        p = self.p
        k, t, d = keys or p['keys'], per_key or p['per_key'], dur or p['dur']
        q = self.new_queue(tag)
        args = [('%s-k%d' % (tag, key), d) for _ in range(t) for key in range(k)]
        self.publish(q, task, args)
        st0 = [self.must_stats(w) for w in workers]
        cpu0 = [tree_cpu(w) for w in workers]
        zk0 = self.zk_snapshot()
        self.consume(q, workers)
        runs = self.wait_runs(q, k * t, workers, timeout=120 + k * t * d * 5)
        cpu1 = [tree_cpu(w) for w in workers]
        self.zk_settle()
        zk1 = self.zk_snapshot()
        self.consume(q, workers, on=False)
        st1 = [self.must_stats(w) for w in workers]
        deliveries = sum(s['deliveries'].get(q, [0, 0, 0])[0] for s in st1)
        redelivered = sum(s['deliveries'].get(q, [0, 0, 0])[1] for s in st1)
        unparked = sum(s['deliveries'].get(q, [0, 0, 0])[2] for s in st1)
        gate = {}
        for a, b in zip(st0, st1):
            for key, val in b['gate'].items():
                gate[key] = gate.get(key, 0) + val - a['gate'].get(key, 0)
        entries = self.count(q, ':entries')
        rejects = self.count(q, ':rejects')
        if deliveries - k * t != redelivered + unparked:
            self.notes.append('%s: deliveries - published = %d but %d flagged redelivered '
                              'and %d unparked' % (tag, deliveries - k * t, redelivered, unparked))
        by_key = {}
        for r in runs:
            by_key.setdefault(r['k'], []).append(r)
        gaps, overlaps = [], 0
        for rs in by_key.values():
            rs.sort(key=lambda r: r['s'])
            for a, b in zip(rs, rs[1:]):
                gap = b['s'] - a['e']
                gaps.append(gap)
                overlaps += gap < 0
        return {
            'drain': max(r['e'] for r in runs) - min(r['s'] for r in runs),
            'executions': len(runs), 'entries': entries, 'rejects': rejects,
            'deliveries': deliveries, 'redelivered': redelivered, 'unparked': unparked,
            'published': k * t,
            'gaps': gaps, 'overlaps': overlaps, 'cpu': sum(cpu1) - sum(cpu0),
            'zk': self.zk_delta(zk0, zk1), 'gate': gate, 'runs': runs,
        }

    def warm_up(self, workers, tag):
        """Every pool process runs once and the in-pool baseline's children open
        their kazoo sessions, so no measured phase pays for it."""
        client = workers[0].client
        warm = self.new_queue('warm-%s' % tag, client=client)
        n = 5 * sum(w.concurrency for w in workers)
        self.publish(warm, 'sleep_inpool', [('warm-%s-%d' % (tag, i), 0.02) for i in range(n)],
                     client=client)
        self.consume(warm, workers)
        self.wait_runs(warm, n, workers, timeout=60)
        self.consume(warm, workers, on=False)

    def contended_workers(self):
        """The two -c 4 workers of rows 2, 2c and 3, started (and warmed) once."""
        if not getattr(self, 'c_workers', None):
            workers = self.start_workers(['c1', 'c2'], concurrency=4, BENCH_COUNT_ENTRIES=1)
            self.warm_up(workers, 'contended')
            self.c_workers = workers
        return self.c_workers

    def row_contended(self):
        p = self.p
        log('row 2: %d keys x %d tasks x %.2f s, 2 workers -c 4' % (
            p['keys'], p['per_key'], p['dur']))
        workers = self.contended_workers()
        variants = [('sleep_inpool', 'inpool'), ('sleep_guarded', 'gate'),
                    ('sleep_guarded_fast', 'gate_fast')]
        out = {label: [] for _, label in variants}
        for rep in range(p['contended_reps']):
            order = variants[rep % 3:] + variants[:rep % 3]
            for task, label in order:
                r = self.contended_phase(workers, task, 'cont-%s-r%d' % (label, rep))
                out[label].append(r)
                log('  %-9s rep %d: drain %.2f s, entries %d, executions %d, '
                    'deliveries %d (redelivered %d), gap median %.0f ms' % (
                        label, rep, r['drain'], r['entries'], r['executions'],
                        r['deliveries'], r['redelivered'], median(r['gaps']) * 1000))
                if r['overlaps']:
                    self.notes.append('%s rep %d: %d overlapping executions of one key!' % (
                        label, rep, r['overlaps']))
        return out

    # -- row 2c: a backlog on one key -------------------------------------------------

    def row_backlog(self):
        """Hot-key drain: n tasks of duration D queued on one key, drained by one
        worker -c 4 (2c) and by two (2d): the physical limit is n x D; what is
        over it is the handover."""
        p = self.p
        n, d = p['backlog'], p['backlog_dur']
        workers = self.contended_workers()
        log('row 2c/2d: %d tasks x %.2f s on one key, 1 and 2 workers -c 4' % (n, d))
        out = {'1': {'inpool': [], 'gate': []}, '2': {'inpool': [], 'gate': []}}
        for rep in range(p['backlog_reps']):
            for nw in ('1', '2'):
                for task, label in (('sleep_inpool', 'inpool'), ('sleep_guarded', 'gate')):
                    r = self.contended_phase(workers[:int(nw)], task, 'backlog%s-%s-r%d' % (
                        nw, label, rep), keys=1, per_key=n, dur=d)
                    out[nw][label].append(r)
                    log('  %s worker(s) %-6s rep %d: drain %.2f s (n x D %.2f), gap median '
                        '%.1f ms' % (nw, label, rep, r['drain'], n * d, median(r['gaps']) * 1000))
                    if r['overlaps']:
                        self.notes.append('backlog %s workers %s rep %d: %d overlapping '
                                          'executions!' % (nw, label, rep, r['overlaps']))
        return out

    # -- row 3: hot key -------------------------------------------------------------

    def hot_phase(self, worker, task, waiters, tag):
        p = self.p
        q = self.new_queue(tag)
        key = '%s-hot' % tag
        self.publish(q, task, [(key, p['hold'])], kwargs={'mark': True})
        self.consume(q, [worker])
        deadline = time.monotonic() + 30
        while self.count(q, ':marks') < 1:
            if time.monotonic() > deadline:
                raise BenchError('%s: the holder did not start' % tag)
            time.sleep(0.01)
        cpu0, zcpu0, t0 = tree_cpu(worker), proc_cpu(self.zk.pid), time.monotonic()
        ent0 = self.count(q, ':entries')
        st0 = self.must_stats(worker)
        del0 = st0['deliveries'].get(q, [0, 0, 0])[0]
        self.publish(q, task, [(key, 0.01)] * waiters)
        # the window ends when the holder's execution record appears
        while not any(r['d'] == p['hold'] for r in self.runs(q)):
            if time.monotonic() > deadline + p['hold']:
                raise BenchError('%s: the holder did not end' % tag)
            time.sleep(0.01)
        cpu1, zcpu1, t1 = tree_cpu(worker), proc_cpu(self.zk.pid), time.monotonic()
        st1 = self.must_stats(worker)
        del1 = st1['deliveries'].get(q, [0, 0, 0])[0]
        # the waiters are not drained (hundreds of serial runs say nothing more):
        # stop consuming, drop what is left, let the room waiters finish
        self.consume(q, [worker], on=False)
        self.quiesce(q, [worker], park=[] if task in UNGUARDED else [self.park_queue(task, key)])
        runs = self.runs(q)
        ent1 = self.count(q, ':entries')
        # Pool entries during the hold = all entries after it began minus those
        # that began after the holder's end (the waiters' executions, racing
        # rejects): exact, whatever the polling delay, as every record is in.
        end = next(r['e'] for r in runs if r['d'] == p['hold'])
        late = sum(1 for r in runs if r['s'] >= end)
        late += sum(1 for x in self.redis.lrange('%s:%s:rejects' % (self.records, q), 0, -1)
                    if json.loads(x)['t'] >= end)
        gate = {k: v - st0['gate'].get(k, 0) for k, v in st1['gate'].items()}
        return {
            'cpu': cpu1 - cpu0, 'zk_cpu': zcpu1 - zcpu0, 'window': t1 - t0,
            'entries': max(0, ent1 - ent0 - late), 'deliveries': del1 - del0,
            'gate': gate, 'waiters': waiters,
        }

    def row_hot(self):
        p = self.p
        worker = self.contended_workers()[0]
        log('row 3: hot key held %.1f s with %d waiters, 1 worker -c 4' % (
            p['hold'], p['waiters']))
        out = {}
        out['idle'] = self.hot_phase(worker, 'sleep_guarded', 0, 'hot-idle')
        for task, label in (('sleep_inpool', 'inpool'), ('sleep_guarded', 'gate'),
                            ('sleep_guarded_fast', 'gate_fast')):
            out[label] = self.hot_phase(worker, task, p['waiters'], 'hot-%s' % label)
            r = out[label]
            log('  %-9s cpu %.2f s over %.1f s, pool entries %d, deliveries %d, gate %s' % (
                label, r['cpu'], r['window'], r['entries'], r['deliveries'],
                {k: v for k, v in r['gate'].items() if v}))
        return out

    # -- all ------------------------------------------------------------------------

    def run(self, rows=ROW_GROUPS, profile=False):
        res = {}
        if '1' in rows:
            res['uncontended'] = self.row_uncontended()
            if profile:
                res['profile'] = pyspy.profile(self)
            self.stop_workers([self.u_worker])  # idle from here on: off the cores
        if '2' in rows:
            res['contended'] = self.row_contended()
        if '2c' in rows:
            res['backlog'] = self.row_backlog()
        if '3' in rows:
            res['hot'] = self.row_hot()
        if getattr(self, 'c_workers', None):
            self.stop_workers(self.c_workers)
        if '5' in rows:
            res['behind'] = hotkey.row_behind(self)
        if '6' in rows:
            res['spread'] = hotkey.row_spread(self)
        return res


# --------------------------------------------------------------------------- report

def machine_info(versions):
    model = '?'
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:  # the model name is only in /proc/cpuinfo (psutil does not give it)
        pass
    mem = '%.0f GiB' % (psutil.virtual_memory().total / 1024 ** 3)
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    v = versions
    return [
        'Machine: %s cores (%s usable), %s, %s RAM, Linux %s' % (
            cores, usable, model, mem, platform.release()),
        'Software: Python %s, Celery %s, kombu %s, billiard %s, kazoo %s, ZooKeeper %s, '
        'RabbitMQ %s, Redis %s' % (
            v['python'], v['celery'], v['kombu'], v['billiard'], v['kazoo'],
            v['zookeeper'], v['rabbitmq'], v['redis-server']),
    ]


def build_rows(res, p):
    """Rows of the table: (row id, metric, unguarded, in-pool, gate, ratio), and
    section headers (row id, SECTION, title), for the rows that ran."""
    rows = []
    for name, fn in (('uncontended', rows_uncontended), ('contended', rows_contended),
                     ('backlog', rows_backlog), ('hot', rows_hot), ('uncontended', rows_zk)):
        if name in res:
            fn(res, p, rows)
    return rows + hotkey.report_rows(res, p)


def drains(rs):
    return [r['drain'] for r in rs]


def per_task(rs, fn):
    return median([fn(r) / r['n'] for r in rs]) * 1000


def med(rs, fn, digits=0):
    return fmt(median([fn(r) for r in rs]), digits)


def beyond_one(rs):
    """Deliveries beyond one per message: 'redelivered / unparked copies' medians."""
    return '%s / %s' % (med(rs, lambda r: r['redelivered']), med(rs, lambda r: r['unparked']))


def rows_uncontended(res, p, rows):
    un = res['uncontended']
    # -- row 1
    for kind, n, title in (('noop', p['noop_n'], 'noop'),
                           ('sleep', p['sleep_n'], '%d ms' % round(p['sleep_d'] * 1000))):
        d = un[kind]
        row = '1' if kind == 'noop' else '1b'
        plain, gate, inpool = drains(d['plain']), drains(d['gate']), drains(d['inpool'])
        ratios = [a / b for a, b in zip(plain, gate)]
        ratios_in = [a / b for a, b in zip(plain, inpool)]
        rows.append((row, SECTION, 'Uncontended: %d x %s task, unique keys, 1 worker -c 2 '
                     '(ratio = unguarded / guarded drain time; 1.0 = free)' % (n, title)))
        rows.append((row, 'drain time, s', fmt_range(plain), fmt_range(inpool), fmt_range(gate),
                     '%s (in-pool %s)' % (fmt_range(ratios), fmt(median(ratios_in)))))
        if kind == 'sleep':
            rows.append((row, 'physical limit n x D / c, s', '%.2f' % (n * p['sleep_d'] / 2),
                         '', '', ''))
        rows.append((row, 'throughput, tasks/s', fmt(n / median(plain), 0),
                     fmt(n / median(inpool), 0), fmt(n / median(gate), 0), ''))
        rows.append((row, 'added time per task, ms', '0',
                     fmt((median(inpool) - median(plain)) / n * 1000, 3),
                     fmt((median(gate) - median(plain)) / n * 1000, 3), ''))
        main = {k: per_task(d[k], lambda r: r['main_cpu']) for k in d}
        rows.append((row, 'worker main process CPU per task, ms', fmt(main['plain'], 3),
                     fmt(main['inpool'], 3), fmt(main['gate'], 3),
                     'gate / unguarded %s' % fmt(main['gate'] / main['plain'])))
        split = {k: '%s + %s' % (
            fmt(per_task(d[k], lambda r: r['main_thread_cpu']), 3),
            fmt(max(0.0, per_task(d[k], lambda r: r['main_cpu'] - r['main_thread_cpu'])), 3))
            for k in d}
        rows.append((row, '  of which consumer (main) thread + other threads (kazoo), ms',
                     split['plain'], split['inpool'], split['gate'], ''))
        pool = {k: per_task(d[k], lambda r: r['tree_cpu'] - r['main_cpu']) for k in d}
        rows.append((row, 'pool processes CPU per task, ms', fmt(pool['plain'], 3),
                     fmt(pool['inpool'], 3), fmt(pool['gate'], 3), ''))
        other = {k: '%s / %s / %s' % (
            fmt(per_task(d[k], lambda r: r['zk']['cpu']), 3),
            fmt(per_task(d[k], lambda r: r['services_cpu']['rabbitmq']), 3),
            fmt(per_task(d[k], lambda r: r['services_cpu']['redis']), 3)) for k in d}
        rows.append((row, 'ZooKeeper / RabbitMQ / Redis CPU per task, ms', other['plain'],
                     other['inpool'], other['gate'], ''))
        def measured(r):
            return (r['tree_cpu'] + r['zk']['cpu'] + r['services_cpu']['rabbitmq'] +
                    r['services_cpu']['redis'])
        tot = {k: per_task(d[k], measured) for k in d}
        rows.append((row, 'sum: worker + ZooKeeper + RabbitMQ + Redis CPU per task, ms',
                     fmt(tot['plain'], 3), fmt(tot['inpool'], 3), fmt(tot['gate'], 3),
                     'gate / unguarded %s' % fmt(tot['gate'] / tot['plain'])))

        def busy(rs, key, cores=1):
            return fmt(median([r[key] / r['window'] / cores for r in rs]) * 100, 0)
        ncpu = os.cpu_count() or 1
        rows.append((row, 'busy during the drain: worker main process / machine, %',
                     '%s / %s' % (busy(d['plain'], 'main_cpu'), busy(d['plain'], 'machine_cpu', ncpu)),
                     '%s / %s' % (busy(d['inpool'], 'main_cpu'), busy(d['inpool'], 'machine_cpu', ncpu)),
                     '%s / %s' % (busy(d['gate'], 'main_cpu'), busy(d['gate'], 'machine_cpu', ncpu)),
                     ''))


def rows_contended(res, p, rows):
    c = res['contended']
    k, t, dur = p['keys'], p['per_key'], p['dur']
    limit = t * dur
    base = c['inpool']
    for label, title in (('gate', 'mutex_requeue_delay 1 s (default)'),
                         ('gate_fast', 'mutex_requeue_delay 0.1 s')):
        s = c[label]
        row = '2' if label == 'gate' else '2b'
        bd, sd = median(drains(base)), median(drains(s))
        rows.append((row, SECTION, 'Contended: %d keys x %d tasks x %.1f s, 2 workers -c 4; '
                     'gate with %s%s' % (k, t, dur, title,
                                         '' if label == 'gate' else '; same baseline runs')))
        rows.append((row, 'drain time, s (x physical limit T x D = %.1f s)' % limit, '',
                     '%s (%.2fx)' % (fmt(bd), bd / limit), '%s (%.2fx)' % (fmt(sd), sd / limit),
                     'in-pool / gate %s' % fmt(bd / sd)))
        rows.append((row, 'pool entries that did not execute (goal 0)', '',
                     med(base, lambda r: r['entries'] - r['executions']),
                     med(s, lambda r: r['entries'] - r['executions']), ''))
        rows.append((row, 'deliveries beyond one per message: redelivered / unparked copies',
                     '', beyond_one(base), beyond_one(s), ''))
        bg = [g for r in base for g in r['gaps']]
        sg = [g for r in s for g in r['gaps']]
        rows.append((row, 'handover gap, same key, median / p99, ms', '',
                     '%s / %s' % (fmt(median(bg) * 1000, 0), fmt(pct(bg, 99) * 1000, 0)),
                     '%s / %s' % (fmt(median(sg) * 1000, 0), fmt(pct(sg, 99) * 1000, 0)), ''))
        bc = median([r['cpu'] for r in base])
        sc = median([r['cpu'] for r in s])
        rows.append((row, 'CPU of both worker trees, s', '', fmt(bc), fmt(sc),
                     'in-pool / gate %s' % fmt(bc / max(sc, 1.0 / CLK_TCK), 1)))


def rows_backlog(res, p, rows):
    n, d = p['backlog'], p['backlog_dur']
    for nw, row in (('1', '2c'), ('2', '2d')):
        bl = res['backlog'][nw]
        rows.append((row, SECTION, 'Hot-key drain: %d tasks x %.0f ms queued for one key, %s '
                     '-c 4 (physical limit n x D = %.1f s; with 5 ms per handover n x (D + 5 ms) '
                     '= %.1f s)' % (n, d * 1000, '1 worker' if nw == '1' else '2 workers',
                                    n * d, n * (d + 0.005))))
        bd, sd = median(drains(bl['inpool'])), median(drains(bl['gate']))

        def cell(x):
            return '%s (%.2fx / %.2fx)' % (fmt(x), x / (n * d), x / (n * (d + 0.005)))
        rows.append((row, 'drain time, s (x n x D / x n x (D + 5 ms))', '', cell(bd), cell(sd),
                     'in-pool / gate %s' % fmt(bd / sd)))
        bg = [g for r in bl['inpool'] for g in r['gaps']]
        sg = [g for r in bl['gate'] for g in r['gaps']]
        def gaps(g):
            return '%s / %s / %s' % (fmt(median(g) * 1000, 1), fmt(pct(g, 99) * 1000, 1),
                                     fmt(max(g) * 1000, 0))
        rows.append((row, 'handover (end of one to start of the next), median / p99 / max, ms',
                     '', gaps(bg), gaps(sg), ''))
        rows.append((row, 'deliveries beyond one per message: redelivered / unparked copies',
                     '', beyond_one(bl['inpool']), beyond_one(bl['gate']), ''))


def rows_hot(res, p, rows):
    h = res['hot']
    for label, title in (('gate', 'mutex_requeue_delay 1 s (default)'),
                         ('gate_fast', 'mutex_requeue_delay 0.1 s')):
        s, b, idle = h[label], h['inpool'], h['idle']
        row = '3' if label == 'gate' else '3b'
        w = p['waiters']
        rows.append((row, SECTION, 'Waiting costs: key held %.0f s by a running task, %d more '
                     'messages for it published meanwhile, 1 worker -c 4; gate with %s, parking '
                     'on (unguarded column: the holder alone, nothing waiting)' % (
                         p['hold'], w, title)))
        rows.append((row, 'worker tree CPU over the hold, s', fmt(idle['cpu']), fmt(b['cpu']),
                     fmt(s['cpu']),
                     'in-pool / gate %s' % fmt(b['cpu'] / max(s['cpu'], 1.0 / CLK_TCK), 0)))
        rows.append((row, '  per waiting message, ms', '', fmt(b['cpu'] / w * 1000, 3),
                     fmt(s['cpu'] / w * 1000, 3), ''))
        rows.append((row, 'pool entries / broker deliveries during the hold',
                     '%d / %d' % (idle['entries'], idle['deliveries']),
                     '%d / %d' % (b['entries'], b['deliveries']),
                     '%d / %d' % (s['entries'], s['deliveries']), ''))
        rows.append((row, '  deliveries per waiting message', '', fmt(b['deliveries'] / w),
                     fmt(s['deliveries'] / w), ''))
        rows.append((row, 'waiting messages parked during the hold (gate counter)', '', '',
                     str(s['gate'].get('parked', 0)), ''))
        rows.append((row, 'ZooKeeper server CPU over the hold, s', fmt(idle['zk_cpu']),
                     fmt(b['zk_cpu']), fmt(s['zk_cpu']), ''))


def rows_zk(res, p, rows):
    un = res['uncontended']
    # -- row 4
    n = p['noop_n']
    d = un['noop']

    def zk_per_task(rs, key):
        vals = [r['zk'][key] for r in rs]
        if any(v is None for v in vals):
            return None
        return sum(vals) / float(n * len(rs))
    rows.append(('4', SECTION, 'ZooKeeper operations per task: uncontended %d x noop '
                 '(row 1), server counters before/after' % n))
    for key, title in (('cversion', 'creates + deletes (namespace cversion)'),
                       ('writes', 'write requests (mntr zk_cnt_updatelatency)'),
                       ('reads', 'read requests (mntr zk_cnt_readlatency)'),
                       ('recv', 'packets received (mntr zk_packets_received)'),
                       ('sent', 'packets sent (mntr zk_packets_sent)')):
        ck = 'inpool_cversion' if key == 'cversion' else key
        rows.append(('4', title, fmt(zk_per_task(d['plain'], key), 3),
                     fmt(zk_per_task(d['inpool'], ck), 3), fmt(zk_per_task(d['gate'], key), 3),
                     ''))

    def write_latency(rs):
        cnt = sum(r['zk']['writes'] or 0 for r in rs)
        tot = sum(r['zk']['write_ms'] or 0 for r in rs)
        return tot / cnt if cnt else None
    rows.append(('4', 'server-side write latency, mean ms', fmt(write_latency(d['plain']), 2),
                 fmt(write_latency(d['inpool']), 2), fmt(write_latency(d['gate']), 2), ''))


HEADERS = ('row', 'metric', 'unguarded', 'in-pool lock (baseline)', 'consumer gate (subject)',
           'ratio')


def text_table(rows):
    body = [r for r in rows if r[1] is not SECTION]
    widths = [max(len(str(r[i])) for r in body + [HEADERS]) for i in range(len(HEADERS))]

    def line(r):
        return '  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(HEADERS), '  '.join('-' * w for w in widths)]
    for r in rows:
        if r[1] is SECTION:
            out.append('%s  %s' % (r[0].ljust(widths[0]), r[2]))
        else:
            out.append(line(('',) + tuple(r[1:])))
    return '\n'.join(out)


def md_table(rows):
    def cell(c):
        return str(c).replace('|', '\\|') or ' '
    out = ['| ' + ' | '.join(HEADERS) + ' |', '|' + '---|' * len(HEADERS)]
    for r in rows:
        if r[1] is SECTION:
            out.append('| **%s** | **%s** |  |  |  |  |' % (r[0], cell(r[2])))
        else:
            out.append('| ' + ' | '.join(cell(c) for c in ('',) + tuple(r[1:])) + ' |')
    return '\n'.join(out)


def method_lines(p, quick, rows=ROW_GROUPS):
    out = [
        'Method (%s run%s; details in bench/README.md):' % (
            'quick' if quick else 'full',
            '' if tuple(rows) == ROW_GROUPS else ', rows %s only' % ','.join(rows)),
        '- Real prefork `celery worker`s (prefetch multiplier 4, results ignored), the local '
        'RabbitMQ as broker (rows 5c: Redis), a private standalone ZooKeeper on this machine; '
        'every execution appends one record to Redis from the pool process. Columns: '
        'unguarded task, in-pool lock (baseline: acks_late, kazoo client per pool process, '
        'ephemeral create in the task, NodeExists -> Reject(requeue=True), delete in finally), '
        'consumer gate (subject).',
    ]
    if '1' in rows:
        out.append(
            '- Rows 1/1b: all %d noop / %d x %d ms messages are published to a fresh queue, '
            'then the same warm worker is told to consume it (add_consumer); drain time = last '
            'execution end - first execution start, from the records. Median (min-max) of %d '
            'rep(s), order of the variants rotated per rep. CPU from /proc per process; '
            'machine busy is /proc/stat (all cores) and includes anything else running.' % (
                p['noop_n'], p['sleep_n'], round(p['sleep_d'] * 1000), p['reps']))
    if '2' in rows or '2c' in rows:
        out.append(
            '- Rows 2/2b/2c/2d: pool entries counted with task_prerun in the pool processes; '
            'deliveries counted in the consumer on task_received (before the gate); beyond one '
            'per message they are redeliveries (the redelivered flag) or unparked copies '
            '(header x-mutex-unparked; the run checks that the two add up); gap = next start - '
            'previous end on the same key. Median of %d (2/2b) / %d (2c/2d) rep(s); gaps '
            'pooled.' % (p['contended_reps'], p['backlog_reps']))
    if '3' in rows:
        out.append(
            '- Rows 3/3b: utime+stime of the worker\'s process group (main + pool + reaped '
            'children) and deliveries from just before the waiters are published until the '
            'holder\'s end record; then the queue stops being consumed and is purged with the '
            'key\'s park queue (the waiters are not drained).')
    if '1' in rows:
        out.append(
            '- Row 4: deltas of ZooKeeper `mntr` counters and of the namespace node\'s cversion '
            '(+1 per child create and per delete) over the measured row-1 noop phases, per '
            'task.')
    return out + hotkey.method_lines(p, rows)


def report(res, bench, elapsed, load0, load1, rows=ROW_GROUPS):
    p = bench.p
    method = method_lines(p, bench.quick, rows)
    rows = build_rows(res, p)
    head = machine_info(bench.versions) + [
        'Load average before/after: %s / %s (other processes share these cores)' % (
            ' '.join('%.2f' % x for x in load0), ' '.join('%.2f' % x for x in load1)),
        'Run time: %.0f s' % elapsed,
    ]
    notes = ['Note: %s' % n for n in bench.notes]
    prof = pyspy.profile_lines(res.get('profile'))
    text = '\n'.join(head + [''] + method + ['', text_table(rows)] +
                     ([''] + notes if notes else []) + ([''] + prof if prof else []))
    md = '\n'.join(
        ['# celery-mutex-bootstep benchmark results%s' % (' (quick)' if bench.quick else ''),
         '', 'Produced by `python -m bench.run%s`.' % (' --quick' if bench.quick else ''), ''] +
        ['- ' + h for h in head] + [''] + method + ['', md_table(rows)] +
        ([''] + ['- ' + n for n in notes] if notes else []) +
        ([''] + prof if prof else []) + [''])
    return text, md


# --------------------------------------------------------------------------- main

def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m bench.run', description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='small smoke-test version (< ~1.5 min)')
    ap.add_argument('--rows', default=None,
                    help='run only these rows, comma-separated (groups: %s; 1 brings 1b and '
                         '4, 2c brings 2d, 5 brings 5b and 5c); the Markdown then goes to '
                         'bench/results-partial.md unless --out' % ', '.join(ROW_GROUPS))
    ap.add_argument('--profile', action='store_true',
                    help='also profile the worker main process with py-spy (row 1 noop)')
    ap.add_argument('--out', default=None,
                    help='Markdown output (default bench/results.md, or '
                         'bench/results-quick.md with --quick)')
    args = ap.parse_args(argv)
    rows = ROW_GROUPS
    if args.rows:
        asked = {ROW_ALIASES.get(r.strip(), r.strip()) for r in args.rows.split(',') if r.strip()}
        unknown = asked - set(ROW_GROUPS)
        if unknown:
            ap.error('--rows: unknown row(s) %s (rows: %s)' % (
                ', '.join(sorted(unknown)), ', '.join(ROW_GROUPS + tuple(ROW_ALIASES))))
        rows = tuple(r for r in ROW_GROUPS if r in asked)
    if args.profile and '1' not in rows:
        ap.error('--profile needs row 1')
    signal.signal(signal.SIGTERM, _on_sigterm)
    params = dict(QUICK if args.quick else FULL)
    # a partial run never overwrites a full run's results
    default = ('results-quick.md' if args.quick else
               'results.md' if rows == ROW_GROUPS else 'results-partial.md')
    out = args.out or os.path.join(HERE, default)
    bench = Bench(params, args.quick)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    ok = False
    try:
        bench.setup()
        res = bench.run(rows, profile=args.profile)
        ok = True
    finally:
        bench.cleanup(keep_logs=not ok or bool(os.environ.get("BENCH_KEEP_LOGS")))
    elapsed = time.monotonic() - t0
    text, md = report(res, bench, elapsed, load0, os.getloadavg(), rows)
    print(text)
    with open(out, 'w', encoding='utf-8') as f:
        f.write(md)
    log('done in %.0f s; Markdown written to %s' % (elapsed, os.path.relpath(out)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
