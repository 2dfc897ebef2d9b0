"""``make demo``: real workers on a contended workload, with and without the mutex step.

    python -m examples.demo [--quick] [--out PATH] [--seed N]

Starts a private ZooKeeper on a free port (unless ``DEMO_ZK_HOSTS`` is given; see
:mod:`celery_mutex_bootstep.testing`) and four ``celery worker`` processes of
:mod:`examples.demoapp` (prefork, 3 processes each): two with the step
(``--mutex-hosts``) and two without it. The same shuffled workload, in which every
account has several calls, runs first on the guarded pair, then on the unguarded pair
(the contrast run, which shows the overlaps the step prevents). RabbitMQ and Redis must
run (``DEMO_BROKER`` / ``DEMO_BACKEND``; ``make demo`` starts the local ones if needed).

It prints progress once a second, a short summary computed from what the tasks recorded
in Redis, a text timeline per account for each run, and draws both runs into a picture
(``demo.png`` in the current directory, or ``--out``; the README's
picture, ``docs/demo.png``, is one such run).

Everything it started is stopped at the end, also on Ctrl-C, SIGTERM or an error. The
exit status is 0 when, with the step, every task ran exactly once and no two executions
of one account overlapped; 1 when overlaps, lost tasks or wasted executions were found;
2 when the demo could not run; 130 when interrupted.
"""
import argparse
import collections
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from urllib.parse import urlsplit

from celery import Celery

from celery_mutex_bootstep.testing import standalone
from celery_mutex_bootstep.testing.records import Records
from celery_mutex_bootstep.testing.workers import start_worker
from examples.demoapp import workload
from examples.report import report, say

APP = 'examples.demoapp'
TASK = 'demo.sync_account'
DEFAULT_BROKER = 'amqp://guest:guest@127.0.0.1:5672//'
DEFAULT_BACKEND = 'redis://127.0.0.1:6379/4'
EXAMPLES_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCURRENCY = 3

FULL = dict(accounts=5, per_account=8, durations=(0.2, 0.5), timeout=60.0)
QUICK = dict(accounts=3, per_account=5, durations=(0.1, 0.3), timeout=25.0)


class DemoError(RuntimeError):
    """The demo cannot run (a service is missing); the message says what to do."""


def check_reachable(what, url, default_port, hint):
    """Raise DemoError unless something listens where *url* points."""
    parts = urlsplit(url)
    host, port = parts.hostname or '127.0.0.1', parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        raise DemoError('%s is not reachable on %s:%d (%s): %s' % (what, host, port, exc, hint))


class Run:
    """One pass of the workload on one pair of workers (with or without the step)."""

    def __init__(self, name, guarded, tag):
        self.name, self.guarded = name, guarded
        self.queue = 'mutex-demo-%s-%s' % (tag, name)
        self.record_list = 'mutex-demo:records:%s:%s' % (tag, name)
        self.workers, self.ids = [], []
        self.records = None
        self.published = self.finished = None

    @property
    def elapsed(self):
        return (self.finished or time.time()) - self.published


class Demo:
    def __init__(self, args):
        self.args = args
        self.size = QUICK if args.quick else FULL
        self.tag = uuid.uuid4().hex[:6]
        self.workdir = tempfile.mkdtemp(prefix='mutex-demo-')
        self.keep_workdir = False
        self.zk = None
        self.zk_hosts = os.environ.get('DEMO_ZK_HOSTS')
        self.broker = os.environ.get('DEMO_BROKER', DEFAULT_BROKER)
        self.backend = os.environ.get('DEMO_BACKEND', DEFAULT_BACKEND)
        self.record_url = os.environ.get('DEMO_RECORD_URL', self.backend)
        self.runs = [Run('guarded', True, self.tag), Run('unguarded', False, self.tag)]
        self.client = None
        self.timings = collections.OrderedDict()
        self.stopped = []

    # ----------------------------------------------------------------- setup
    def setup(self):
        t = time.monotonic()
        check_reachable('the broker', self.broker, 5672,
                        'start RabbitMQ (make demo does) or set DEMO_BROKER')
        check_reachable('Redis', self.record_url, 6379,
                        'start redis-server (make demo does) or set DEMO_BACKEND')
        if self.zk_hosts:
            say('ZooKeeper: %s (DEMO_ZK_HOSTS)' % self.zk_hosts)
        else:
            self.zk = standalone()
            self.zk_hosts = self.zk.hosts
            say('ZooKeeper: started a private server on %s' % self.zk_hosts)
        self.client = Celery('mutex-demo-client', broker=self.broker, backend=self.backend,
                             set_as_current=False)
        self.client.conf.broker_connection_retry_on_startup = True
        for run in self.runs:
            run.records = Records(run.record_list, self.record_url)  # starts empty
            env = {'DEMO_BROKER': self.broker, 'DEMO_BACKEND': self.backend,
                   'DEMO_RECORD_URL': self.record_url, 'DEMO_RECORDS': run.record_list,
                   'DEMO_QUEUE': run.queue, 'DEMO_UNGUARDED': '0' if run.guarded else '1'}
            extra = ['--mutex-hosts', self.zk_hosts] if run.guarded else []
            for letter in 'ab':
                w = start_worker(APP, hostname='%s-%s-%s@%%h' % (run.name, letter, self.tag),
                                 concurrency=CONCURRENCY, pool='prefork', extra_args=extra,
                                 env=env, loglevel='INFO', pythonpath=[EXAMPLES_PARENT],
                                 log_dir=os.path.join(self.workdir, 'logs'))
                w.nodename = _nodename(w.hostname)  # what tasks see as request.hostname
                w.letter = letter.upper()
                run.workers.append(w)
        for run in self.runs:  # all four start at once: one wait for the slowest
            for w in run.workers:
                w.wait_ready(60)
        say('workers: 2 with the step (--mutex-hosts %s), 2 without; prefork, -c %d each'
            % (self.zk_hosts, CONCURRENCY))
        self.timings['setup'] = time.monotonic() - t

    # ----------------------------------------------------------------- workload
    def calls(self):
        size = self.size
        return workload(size['accounts'], size['per_account'], size['durations'],
                        seed=self.args.seed)

    def run(self, run, calls):
        with self.client.producer_or_acquire() as producer:
            run.published = time.time()
            for account, duration in calls:
                result = self.client.send_task(TASK, args=(account, duration),
                                               queue=run.queue, producer=producer)
                run.ids.append(result.id)
        label = 'with the step' if run.guarded else 'WITHOUT the step (contrast run)'
        say('%s: published %d tasks (%d accounts x %d calls of %.1f-%.1f s, shuffled)' % (
            label, len(calls), self.size['accounts'], self.size['per_account'],
            *self.size['durations']))
        self.watch(run)
        self.timings[run.name] = run.elapsed
        for w in run.workers:
            w.terminate()  # done: let them shut down meanwhile (stop_workers waits)

    def watch(self, run):
        ids = set(run.ids)
        deadline = time.monotonic() + self.size['timeout']
        letters = {w.nodename: w.letter for w in run.workers}
        accounts = sorted({'acct-%d' % (i + 1) for i in range(self.size['accounts'])},
                          key=lambda a: int(a.split('-')[1]))
        next_line = time.monotonic() + 1.0
        while True:
            time.sleep(0.05)
            executions = run.records.executions()
            done = len({e.id for e in executions if e.end is not None} & ids)
            running = collections.defaultdict(str)
            for e in executions:
                if e.end is None:
                    running[e.key] += letters.get(e.worker, '?')
            finished = done == len(ids) and not running
            if finished:
                run.finished = max(e.end for e in executions)
            if time.monotonic() >= next_line or finished:  # one line per second
                next_line += 1.0
                cols = []
                for account in accounts:
                    who = ''.join(sorted(running.get(account, ''))) or '-'
                    cols.append('%s:%s%s' % (account, who, '!' if len(who) > 1 else ''))
                say('[%5.1fs] done %*d/%d  running  %s' % (
                    run.elapsed, len(str(len(ids))), done, len(ids), ' '.join(cols)))
            if finished:
                return
            if time.monotonic() >= deadline:
                say('timed out after %.0f s with %d of %d tasks done' % (
                    self.size['timeout'], done, len(ids)))
                run.finished = time.time()
                return

    def stop_workers(self):
        t = time.monotonic()
        workers = [w for run in self.runs for w in run.workers]
        for w in workers:
            w.terminate()  # warm shutdown of all at once
        for w in workers:
            w.stop(timeout=15)
            self.stopped.append('worker %s' % w.nodename)
        self.timings['stop workers'] = time.monotonic() - t

    # ----------------------------------------------------------------- teardown
    def teardown(self):
        t = time.monotonic()
        stopped = self.stopped
        for run in self.runs:
            for w in run.workers:
                try:
                    if w.is_running():
                        w.stop(timeout=10)
                        stopped.append('worker %s' % w.nodename)
                    else:
                        w.kill_group()  # leftover pool processes, if any
                except Exception as exc:
                    say('could not stop worker %s: %r' % (w.hostname, exc))
            if self.client is not None:
                try:
                    with self.client.connection_for_write() as conn:
                        conn.default_channel.queue_delete(run.queue)
                        conn.default_channel.exchange_delete(run.queue)
                except Exception:
                    pass
            if run.records is not None:
                try:
                    run.records.redis.delete(run.record_list)
                except Exception:
                    pass
        if self.zk is not None:
            try:
                self.zk.close()
                stopped.append('ZooKeeper')
            except Exception as exc:
                say('could not stop ZooKeeper: %r' % (exc,))
        if self.keep_workdir:
            say('worker logs kept in %s' % os.path.join(self.workdir, 'logs'))
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings['teardown'] = time.monotonic() - t
        return stopped


def _nodename(hostname):
    host = socket.gethostname()
    return hostname.replace('%h', host).replace('%n', host.split('.')[0])


def _terminate(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m examples.demo', description=(
        'Real Celery workers on a contended workload, with and without the mutex step.'))
    parser.add_argument('--quick', action='store_true',
                        help='a smaller workload (%d accounts x %d calls)' % (
                            QUICK['accounts'], QUICK['per_account']))
    parser.add_argument('--out', default='demo.png',
                        help='where to draw the timeline picture (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=None, help='seed of the shuffled workload')
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    demo = Demo(args)
    rc, problems, stopped = 2, None, []
    try:
        demo.setup()
        calls = demo.calls()
        for run in demo.runs:
            demo.run(run, calls)
        t = time.monotonic()
        # from Redis only: drawn while the workers (already told to stop) shut down
        problems = report(demo.runs, demo.size, CONCURRENCY, args.out)
        demo.timings['report'] = time.monotonic() - t
        demo.stop_workers()
        rc = 1 if problems else 0
    except KeyboardInterrupt:
        say('\ninterrupted: stopping everything the demo started')
        rc = 130
    except DemoError as exc:
        say('\nthe demo could not run: %s' % (exc,))
    except Exception as exc:
        say('\nthe demo could not run: %s' % (exc,))
        traceback.print_exc()
    finally:
        # no second interruption half-way through the cleanup
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.keep_workdir = rc in (1, 2)  # a failure: keep the logs to look at
            stopped = demo.teardown()
        finally:
            signal.signal(signal.SIGINT, old)
    say('stopped: %s' % (', '.join(stopped) or 'nothing'))
    say('timings: %s; total %.1f s' % (
        ', '.join('%s %.1f s' % kv for kv in demo.timings.items()), time.monotonic() - started))
    if rc == 0:
        say('demo OK: with the step every task ran exactly once and no two executions of '
            'one account overlapped')
    elif problems:
        say('demo FAILED: %s' % ', '.join(problems))
    return rc


if __name__ == '__main__':
    sys.exit(main())
