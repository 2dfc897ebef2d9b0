"""Chaos: guarded tasks over three workers while faults hit at random.

Faults: ZooKeeper crash and restart, ZooKeeper down longer than the session timeout,
a worker SIGKILLed and restarted, a worker's broker connections closed, a worker cut off
from ZooKeeper (its TCP proxy stalled) for longer than the session timeout. Tasks go out
in waves, one just before, one during and one after each fault, so every fault finds
work running and queued.

Waves are sized so that the faults find work running: with 10-100 ms tasks a
session loss, which stops holders only at the session deadline, mostly finds them done.

Asserted:
* no two executions of one lock overlap, counting every execution interval (a killed
  one runs until its process was seen dead);
* every task executed at least once, and completed, except an early-acked ``work``
  task (a quarter of them; the rest are ``work_late``) that a pool process of a worker
  had accepted when the worker was SIGKILLed: running there, or acked when accepted by
  a process that died before the task recorded its start (Celery's at-most-once for
  ``acks_late=False``; the worker logs each acceptance, TEST_LOG_ACCEPTED). One it had
  only received was unacknowledged: it must come back;
* exactly once where no fault touched the task: a task is touched when one of its
  execution intervals intersects the window of a fault that hit its worker, ZooKeeper
  or its broker connection.

``test_chaos_short`` (300 tasks, one fault of each kind) runs by default;
``test_chaos_full`` (2,000 tasks, 20 faults) only with ``--run-chaos-full`` (make chaos).
CHAOS_SEED=<n> replays a fault plan (the timing still varies).
"""
import collections
import os
import random
import re
import time
from dataclasses import dataclass
from typing import List, Optional

import pytest

from .scenario import wait_for
from .faults import (  # noqa: F401  (fixtures)
    SESSION_TIMEOUT, assert_no_overlap, assert_no_overlap_until_stopped,
    close_broker_connections, describe, lease_report, mutex_log, proxy_factory, session_args,
    span_end, watch_factory)

pytestmark = pytest.mark.faults  # make faults (integration/conftest.py)

ACCEPTED = re.compile(r'test: accepted ([0-9a-f-]+) pid')  # testapp's TEST_LOG_ACCEPTED
KINDS = ('zk_restart', 'zk_down', 'worker_kill', 'broker_reset', 'proxy_stall')
WORKERS = ('w1', 'w2', 'w3')
SLACK = 0.5  # seconds before a fault's start that still count as touched


@dataclass
class Fault:
    kind: str
    target: Optional[str]  # worker node name, None: every worker (ZooKeeper)
    t0: float
    t1: float = 0.0
    after: float = SLACK  # seconds after t1 whose executions still count as touched
    note: str = ''

    @property
    def window(self):
        return self.t0 - SLACK, self.t1 + self.after

    def touches(self, ex, end):
        lo, hi = self.window
        return (self.target is None or self.target == ex.worker) and ex.start <= hi \
            and end >= lo


class Chaos:
    def __init__(self, s, node, proxy_factory, watch_factory, *, n_tasks, n_faults, seed,
                 n_keys=12, concurrency=3):
        self.s = s
        self.node = node
        self.rnd = random.Random(seed)
        self.seed = seed
        self.n_tasks = n_tasks
        self.n_keys = n_keys
        self.concurrency = concurrency
        self.proxies = {name: proxy_factory(node) for name in WORKERS}
        self.workers = {}
        for name in WORKERS:
            self.workers[name] = self._start(name)
        for w in self.workers.values():
            w.wait_ready()
        self.watch = watch_factory(s)
        plan = list(KINDS)
        self.rnd.shuffle(plan)
        while len(plan) < n_faults:
            plan.append(self.rnd.choice(KINDS))
        self.plan = plan
        # per fault: half of its share just before it, a quarter during, a quarter after
        self.wave_size = max(1, n_tasks // (4 * len(plan)))
        self.handles = []
        self.kind_of = {}
        self.faults: List[Fault] = []
        self.killed = []  # WorkerProcess of every SIGKILLed worker

    def _start(self, name):
        return self.s.worker(name, concurrency=self.concurrency,
                             hosts=self.proxies[name].hosts,
                             extra_args=session_args(), wait=False,
                             env={'TEST_LOG_ACCEPTED': '1'})

    # -- work ----------------------------------------------------------------
    def wave(self, n=None, long=False):
        n = self.wave_size if n is None else n
        for _ in range(min(n, self.n_tasks - len(self.handles))):
            task = 'work' if self.rnd.random() < 0.25 else 'work_late'
            key = f'c{self.rnd.randrange(self.n_keys)}'
            # Mostly short tasks, and one in ten long enough (1-3 s) that a session
            # loss, which stops holders only at its deadline, still finds some running.
            # The long wave before a fault outlives the session deadline (about
            # 3/4 of SESSION_TIMEOUT after the fault starts), so a session loss
            # always finds its holders running.
            duration = (self.rnd.uniform(SESSION_TIMEOUT + 0.5, SESSION_TIMEOUT + 2.0) if long
                        else self.rnd.uniform(1.0, 3.0) if self.rnd.random() < 0.1
                        else self.rnd.uniform(0.01, 0.1))
            h = self.s.send(task, key, round(duration, 3), len(self.handles))
            self.handles.append(h)
            self.kind_of[h.id] = task

    # -- faults --------------------------------------------------------------
    def inject(self, kind):
        s, T = self.s, SESSION_TIMEOUT
        if kind == 'zk_restart':
            f = Fault(kind, None, time.time(), after=T + 1)
            self.node.kill()
            self.wave()
            self.node.start()
            self.node.wait_ready()
        elif kind == 'zk_down':
            down = self.rnd.uniform(1.25, 2.0) * T
            f = Fault(kind, None, time.time(), after=T + 1, note=f'{down:.1f}s')
            self.node.stop()
            self.wave()
            time.sleep(max(0.0, f.t0 + down - time.time()))
            self.node.start()
            self.node.wait_ready()
        elif kind == 'worker_kill':
            name = self.rnd.choice(WORKERS)
            w = self.workers[name]
            f = Fault(kind, s.nodename(w), time.time(), note=name)
            w.kill()
            w.kill_group()
            f.t1 = time.time()
            self.killed.append(w)
            self.wave()
            self.workers[name] = self._start(name)
            self.workers[name].wait_ready()
            self.faults.append(f)
            return f
        elif kind == 'broker_reset':
            name = self.rnd.choice(WORKERS)
            w = self.workers[name]
            f = Fault(kind, s.nodename(w), time.time(), after=1.0)
            closed = close_broker_connections(w)
            f.note = f'{name}, {closed} connection(s)'
            assert closed >= 1, f'no broker connection of {name} to close'
            self.wave()
        elif kind == 'proxy_stall':
            name = self.rnd.choice(WORKERS)
            stall = self.rnd.uniform(1.5, 2.0) * T
            f = Fault(kind, s.nodename(self.workers[name]), time.time(), after=T + 1,
                      note=f'{name} {stall:.1f}s')
            self.proxies[name].stall()
            self.wave()
            time.sleep(max(0.0, f.t0 + stall - time.time()))
            self.proxies[name].resume()
        else:  # pragma: no cover
            raise ValueError(kind)
        f.t1 = time.time()
        self.faults.append(f)
        return f

    def run(self):
        t_start = time.time()
        time.sleep(self.rnd.uniform(0.2, 1.0))
        for kind in self.plan:
            # a few long tasks first, so every fault finds holders running
            self.wave(3, long=True)
            self.wave(2 * self.wave_size)
            time.sleep(self.rnd.uniform(0.3, 0.5))  # the wave is being worked on
            self.inject(kind)
            self.wave()
            time.sleep(self.rnd.uniform(1.0, 3.0))
        self.wave(self.n_tasks)  # what rounding left
        return t_start

    # -- verdict -------------------------------------------------------------
    def lost_with_worker(self, runs, end_of):
        """Early-acked work tasks a SIGKILLed worker may have taken with it: running
        there when it was killed, or accepted by one of its pool processes (acked then;
        the process may have been killed before the task wrote its start record). A
        task it had only received, not handed to a process, was unacknowledged and
        must come back: it is not excused."""
        completed = {ex.id for ex in runs if ex.end is not None}
        out = set()
        for ex in runs:
            if ex.end is None and self.kind_of.get(ex.id) == 'work':
                for f in self.faults:
                    if f.kind == 'worker_kill' and f.touches(ex, end_of(ex)):
                        out.add(ex.id)
        for w in self.killed:
            for task_id in ACCEPTED.findall(w.log_text()):
                if task_id not in completed and self.kind_of.get(task_id) == 'work':
                    out.add(task_id)
        return out

    def trace(self, task_id, runs):
        """What the records and the worker logs say about one task."""
        lines = [f'{task_id} ({self.kind_of.get(task_id)}):']
        lines += ['  ' + describe(ex, self.watch) for ex in runs if ex.id == task_id]
        for w in list(self.s.workers):
            lines += [f'  {w.hostname} pid {w.pid}: {x[:160]}'
                      for x in w.log_text().splitlines() if task_id in x]
        return '\n'.join(lines)

    def wait_done(self, timeout):
        ids = {h.id for h in self.handles}
        deadline = time.monotonic() + timeout
        while True:
            runs = self.s.records.executions()
            now = time.time()
            done = {r.id for r in runs if r.end is not None}
            excused = self.lost_with_worker(runs, lambda ex: span_end(ex, self.watch, now))
            missing = ids - done - excused
            if not missing:
                return runs
            if time.monotonic() >= deadline:
                workers = list(self.workers.values())
                raise AssertionError(
                    f'seed {self.seed}: {len(missing)} of {len(ids)} tasks never completed:\n'
                    + '\n'.join(self.trace(i, runs) for i in sorted(missing)[:10])
                    + f'\nfaults: {self.faults}\n'
                    f'{lease_report(self.s, workers)}\n{mutex_log(workers)}')
            time.sleep(0.2)


def run_chaos(s, zk_factory, proxy_factory, watch_factory, *, n_tasks, n_faults,
              drain_timeout):
    seed = int(os.environ.get('CHAOS_SEED') or random.randrange(1 << 30))
    print(f'\nchaos seed {seed}: {n_tasks} tasks, {n_faults} faults')
    node = zk_factory()
    s.zk_hosts = node.hosts
    chaos = Chaos(s, node, proxy_factory, watch_factory, n_tasks=n_tasks,
                  n_faults=n_faults, seed=seed)
    t0 = chaos.run()
    runs = chaos.wait_done(drain_timeout)
    test_end = time.time()

    def end_of(ex):
        return span_end(ex, chaos.watch, test_end)

    ids = [h.id for h in chaos.handles]
    assert len(ids) == n_tasks
    assert_no_overlap(runs, chaos.watch, test_end, t0=t0)

    per_id = collections.defaultdict(list)
    for ex in runs:
        per_id[ex.id].append(ex)
    lost = chaos.lost_with_worker(runs, end_of)
    never = [i for i in ids if not per_id[i] and i not in lost]
    assert never == [], f'seed {seed}: {len(never)} tasks never executed:\n' + '\n'.join(
        chaos.trace(i, runs) for i in never[:10])
    touched = {ex.id for ex in runs if any(f.touches(ex, end_of(ex)) for f in chaos.faults)}
    twice_untouched = [i for i in ids if i not in touched and len(per_id[i]) != 1
                       and i not in lost]
    reran = [i for i in ids if len(per_id[i]) > 1]
    killed = [ex for ex in runs if ex.end is None]

    by_kind = collections.Counter(f.kind for f in chaos.faults)
    print(f'faults ({len(chaos.faults)}): ' + ', '.join(
        f'{f.kind}[{f.note}] {f.t0 - t0:.1f}..{f.t1 - t0:.1f}s' for f in chaos.faults))
    print(f'by kind: {dict(by_kind)}')
    print(f'tasks {len(ids)}; executions {len(runs)}; completed tasks '
          f'{sum(1 for i in ids if any(e.end is not None for e in per_id[i]))}; '
          f'killed executions {len(killed)}; tasks run more than once {len(reran)}; '
          f'touched tasks {len(touched)}; untouched tasks run exactly once '
          f'{sum(1 for i in ids if i not in touched and len(per_id[i]) == 1)}; '
          f'early-acked tasks lost with a killed worker {len(lost)}; '
          f'workers {collections.Counter(e.worker.split("-")[0] for e in runs)}; '
          f'run time {test_end - t0:.1f}s')

    assert twice_untouched == [], (
        f'seed {seed}: tasks no fault touched ran more than once:\n' + '\n'.join(
            describe(ex, chaos.watch, t0) for i in twice_untouched[:5] for ex in per_id[i])
        + f'\nfaults: {chaos.faults}')
    assert set(by_kind) == set(KINDS), by_kind
    assert killed or reran, 'the faults hit no running task: the run proves little'
    wait_for(lambda: s.lease_nodes() == [], timeout=15, message='every lease released')
    assert_no_overlap_until_stopped(s, chaos.watch, t0=t0)


def test_chaos_short(zk_factory, proxy_factory, watch_factory, scenario):
    run_chaos(scenario, zk_factory, proxy_factory, watch_factory,
              n_tasks=300, n_faults=len(KINDS), drain_timeout=45)


@pytest.mark.chaos_full
def test_chaos_full(zk_factory, proxy_factory, watch_factory, scenario):
    run_chaos(scenario, zk_factory, proxy_factory, watch_factory,
              n_tasks=2000, n_faults=20, drain_timeout=120)
