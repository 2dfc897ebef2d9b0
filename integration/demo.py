"""``make demo``: two real workers on a contended workload, and proof that the mutex held.

    python -m integration.demo [--quick] [--out PATH] [--seed N]

Starts what is missing (a private ZooKeeper on a free port unless ``DEMO_ZK_HOSTS`` is
given; the local RabbitMQ and Redis unless ``DEMO_BROKER`` / ``DEMO_BACKEND`` are given),
starts two ``celery worker`` processes of :mod:`integration.demoapp` (prefork, 3 processes
each, ``--mutex-hosts``), publishes a shuffled workload in which every account has
several calls, prints progress once a second, and then a summary computed from what the
tasks recorded in Redis and from the workers' logs, a text timeline per account and a PNG
timeline (``demo-timeline.png`` or ``--out``).

Everything it started is stopped at the end, also on Ctrl-C, SIGTERM or an error. The
exit status is 0 when every task ran exactly once and no two executions of one account
overlapped; 1 when overlaps, lost tasks or wasted executions were found; 2 when the demo
could not run; 130 when interrupted.
"""
import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid

from celery import Celery

from integration import brokers, zkserver
from integration.records import Records, by_key, overlaps
from integration.timeline import letters_for, png_timeline, text_timeline
from integration.workers import start_worker

APP = 'integration.demoapp'
TASK = 'demo.sync_account'
DEFAULT_BACKEND = 'redis://127.0.0.1:6379/4'
WORKERS = ('a', 'b')
CONCURRENCY = 3

FULL = dict(accounts=5, per_account=8, durations=(0.2, 0.5), timeout=60.0)
QUICK = dict(accounts=3, per_account=5, durations=(0.1, 0.3), timeout=25.0)

RECEIVED_RE = re.compile(r'Task %s\[([0-9a-f-]+)\] received' % re.escape(TASK))
CONTENDED_RE = re.compile(r'mutex: %s\[([0-9a-f-]+)\] contended on' % re.escape(TASK))
UNAVAILABLE_RE = re.compile(r'mutex: ZooKeeper \(.*\) is not reachable')


def say(*parts):
    print(*parts, flush=True)


# --------------------------------------------------------------------------- analysis

def max_concurrency(executions, now=None):
    """Largest number of executions running at one instant (ends before starts on ties)."""
    end_default = now if now is not None else float('inf')
    events = []
    for e in executions:
        events.append((e.start, 1))
        events.append((e.end if e.end is not None else end_default, -1))
    events.sort(key=lambda ev: (ev[0], ev[1]))
    best = running = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def wasted(executions):
    """Executions that did no useful work: never finished, or a second run of one task."""
    unfinished = [e for e in executions if e.end is None]
    finished = collections.Counter(e.id for e in executions if e.end is not None)
    duplicates = sum(n - 1 for n in finished.values() if n > 1)
    return len(unfinished) + duplicates, unfinished, duplicates


def token_order_violations(executions):
    """Keys whose fencing tokens do not grow with the start time of their executions."""
    bad = []
    for key, runs in by_key(executions).items():
        tokens = [r.token for r in runs]
        if None in tokens or any(b <= a for a, b in zip(tokens, tokens[1:])):
            bad.append(key)
    return bad


def handover_gaps(executions):
    """Gaps between the end of one execution of a key and the start of the next."""
    gaps = []
    for runs in by_key(executions).values():
        for a, b in zip(runs, runs[1:]):
            if a.end is not None:
                gaps.append(b.start - a.end)
    return gaps


def count_log_lines(workers, regex, ids):
    """Per worker, how many log lines match ``regex`` for one of our task ``ids``."""
    out = {}
    for w in workers:
        out[w.nodename] = sum(1 for m in regex.finditer(w.log_text()) if m.group(1) in ids)
    return out


# --------------------------------------------------------------------------- the demo

class Demo:
    def __init__(self, args):
        self.args = args
        self.size = QUICK if args.quick else FULL
        self.tag = uuid.uuid4().hex[:6]
        self.queue = 'mutex-demo-%s' % self.tag
        self.record_list = 'mutex-demo:records:%s' % self.tag
        self.workdir = tempfile.mkdtemp(prefix='mutex-demo-')
        self.keep_workdir = False
        self.zk = None
        self.zk_hosts = os.environ.get('DEMO_ZK_HOSTS')
        self.broker = os.environ.get('DEMO_BROKER')
        self.backend = os.environ.get('DEMO_BACKEND')
        self.record_url = os.environ.get('DEMO_RECORD_URL')
        self.workers = []
        self.client = None
        self.records = None
        self.ids = []
        self.timings = collections.OrderedDict()
        self.stopped = []

    # ----------------------------------------------------------------- setup
    def setup(self):
        t = time.monotonic()
        if self.zk_hosts:
            say('ZooKeeper: %s (DEMO_ZK_HOSTS)' % self.zk_hosts)
        else:
            self.zk = zkserver.standalone()
            self.zk_hosts = self.zk.hosts
            say('ZooKeeper: started a private server on %s' % self.zk_hosts)
        if not self.broker:
            self.broker = self._ensure('RabbitMQ', brokers.ensure_rabbitmq)
        else:
            say('broker: %s (DEMO_BROKER)' % _safe_url(self.broker))
        if not self.backend or not self.record_url:
            self._ensure('Redis', brokers.ensure_redis)
        self.backend = self.backend or DEFAULT_BACKEND
        self.record_url = self.record_url or self.backend
        self.records = Records(self.record_list, self.record_url)  # starts empty
        self.client = Celery('mutex-demo-client', broker=self.broker, backend=self.backend,
                             set_as_current=False)
        self.client.conf.broker_connection_retry_on_startup = True

        env = {'DEMO_BROKER': self.broker, 'DEMO_BACKEND': self.backend,
               'DEMO_RECORD_URL': self.record_url, 'DEMO_RECORDS': self.record_list,
               'DEMO_QUEUE': self.queue, 'DEMO_LOG_CONTENDED': '1'}
        for name in WORKERS:
            w = start_worker(APP, hostname='demo-%s-%s@%%h' % (name, self.tag),
                             concurrency=CONCURRENCY, pool='prefork',
                             extra_args=['--mutex-hosts', self.zk_hosts], env=env,
                             loglevel='INFO', log_dir=os.path.join(self.workdir, 'logs'))
            w.nodename = _nodename(w.hostname)  # what tasks see as request.hostname
            self.workers.append(w)
        for w in self.workers:
            w.wait_ready(60)
        say('workers: %s (prefork, -c %d each, --mutex-hosts %s)' % (
            ', '.join(w.nodename for w in self.workers), CONCURRENCY, self.zk_hosts))
        self.timings['setup'] = time.monotonic() - t

    def _ensure(self, what, ensure):
        before = len(brokers.STARTED)
        url = ensure()
        started = len(brokers.STARTED) > before
        say('%s: %s (%s)' % (what, _safe_url(url), 'started for the demo' if started
                             else 'already running'))
        return url

    # ----------------------------------------------------------------- workload
    def publish(self):
        from integration.demoapp import workload
        size = self.size
        calls = workload(size['accounts'], size['per_account'], size['durations'],
                         seed=self.args.seed)
        with self.client.producer_or_acquire() as producer:
            for account, duration in calls:
                result = self.client.send_task(TASK, args=(account, duration),
                                               queue=self.queue, producer=producer)
                self.ids.append(result.id)
        self.accounts = sorted({a for a, _ in calls}, key=lambda a: int(a.split('-')[1]))
        say('published %d tasks: %d accounts x %d calls of %.1f-%.1f s, shuffled, on queue %s'
            % (len(calls), size['accounts'], size['per_account'], size['durations'][0],
               size['durations'][1], self.queue))

    def watch(self):
        t0 = time.monotonic()
        ids = set(self.ids)
        deadline = t0 + self.size['timeout']
        letters = {w.nodename: chr(ord('A') + i) for i, w in enumerate(self.workers)}
        next_line = t0 + 1.0
        while True:
            time.sleep(0.1)
            executions = self.records.executions()
            done = len({e.id for e in executions if e.end is not None} & ids)
            running = collections.defaultdict(str)
            for e in executions:
                if e.end is None:
                    running[e.key] += letters.get(e.worker, '?')
            finished = done == len(ids) and not running
            if time.monotonic() >= next_line or finished:  # one line per second
                next_line += 1.0
                cols = []
                for account in self.accounts:
                    who = ''.join(sorted(running.get(account, ''))) or '-'
                    cols.append('%s:%s%s' % (account, who, '!' if len(who) > 1 else ''))
                say('[%5.1fs] done %*d/%d  running  %s' % (
                    time.monotonic() - t0, len(str(len(ids))), done, len(ids), ' '.join(cols)))
            if finished:
                break
            if time.monotonic() >= deadline:
                say('timed out after %.0f s with %d of %d tasks done' % (
                    self.size['timeout'], done, len(ids)))
                break
        self.timings['workload'] = time.monotonic() - t0

    def stop_workers(self):
        t = time.monotonic()
        for w in self.workers:
            w.terminate()  # warm shutdown of both at once
        for w in self.workers:
            w.stop(timeout=15)
            self.stopped.append('worker %s' % w.nodename)
        self.timings['stop workers'] = time.monotonic() - t

    def queue_leftover(self):
        """Messages still in our queue after the workers stopped (None: unknown)."""
        try:
            with self.client.connection_for_write() as conn:
                ok = conn.default_channel.queue_declare(queue=self.queue, passive=True)
                return ok.message_count
        except Exception:
            return None

    # ----------------------------------------------------------------- report
    def report(self):
        executions = self.records.executions()
        ids = set(self.ids)
        finished_ids = {e.id for e in executions if e.end is not None}
        lost = sorted(ids - finished_ids)
        n_wasted, unfinished, duplicates = wasted(executions)
        found = overlaps(executions)
        bad_tokens = token_order_violations(executions)
        redelivered = sum(1 for e in executions if e.extra.get('redelivered'))
        received = count_log_lines(self.workers, RECEIVED_RE, ids)
        contended = count_log_lines(self.workers, CONTENDED_RE, ids)
        unavailable_logged = sum(len(UNAVAILABLE_RE.findall(w.log_text())) for w in self.workers)
        leftover = self.queue_leftover()
        letters = letters_for(executions, {w.nodename: chr(ord('A') + i)
                                           for i, w in enumerate(self.workers)})
        gaps = handover_gaps(executions)
        n_deliveries = sum(received.values())
        n_contended = sum(contended.values())
        handed_back = n_deliveries - len(executions)

        def per_worker(counts):
            return ', '.join('%s %d' % (letters.get(w, '?'), n) for w, n in counts.items())

        say('')
        say('== summary ' + '=' * 60)
        say('tasks published:       %d' % len(ids))
        say('executions:            %d (%.1f s of work in a %.1f s run)' % (
            len(executions), sum((e.end or e.start) - e.start for e in executions),
            self.timings.get('workload', 0.0)))
        say('deliveries:            %d (workers\' "received" log lines: %s)' % (
            n_deliveries, per_worker(received)))
        if n_contended:
            say('contended deliveries:  %d (found their account held and waited in the consumer, '
                'not in the pool; the gate\'s "contended" log lines: %s)' % (
                    n_contended, per_worker(contended)))
        elif unavailable_logged or not handed_back:
            say('contended deliveries:  0%s' % (
                ' (ZooKeeper was unreachable: the workers logged it)' if unavailable_logged
                else ''))
        else:
            say('contended deliveries:  not measured (no "contended" log lines from the gate: '
                'its DEBUG logging is off or its wording changed)')
        say('handed back to broker: %d (deliveries - executions: waited past '
            'mutex_requeue_delay%s)' % (handed_back, ', or ZooKeeper was unreachable'
                                        if unavailable_logged else ''))
        say('executions of a redelivered message: %d (their message had gone back to the '
            'broker at least once)' % redelivered)
        say('wasted executions:     %d%s' % (n_wasted, (' (%d unfinished, %d duplicate runs)'
                                                        % (len(unfinished), duplicates))
                                              if n_wasted else ''))
        say('lost tasks:            %d%s' % (len(lost), (
            ' (never completed during the run; e.g. %s)' % ', '.join(lost[:3])) if lost else ''))
        say('messages left in the queue: %s' % ('unknown' if leftover is None else leftover))
        say('overlaps:              %d (pairs of executions of one account running at once)'
            % len(found))
        say('fencing tokens grow per account: %s' % (
            'yes' if not bad_tokens else 'NO for ' + ', '.join(map(str, bad_tokens))))
        say('max concurrency reached: %d (of %d pool processes, %d accounts)' % (
            max_concurrency(executions), CONCURRENCY * len(self.workers), len(self.accounts)))
        if gaps:
            say('hand-over gap per account: median %.3f s, max %.3f s (from the end of one '
                'execution to the start of the next)' % (statistics.median(gaps), max(gaps)))
        say('')
        print(text_timeline(executions, width=70, letters=letters), end='', flush=True)
        out = self.args.out
        layout = png_timeline(executions, out, letters=letters,
                              title='celery-mutex-bootstep demo: executions per account')
        legend = '  '.join('%s = %s %s' % (letter, _color_name(layout['colors'][w]), w)
                           for w, letter in layout['letters'].items())
        say('PNG timeline: %s (%dx%d; %s)' % (out, layout['width'], layout['height'],
                                              legend or 'no executions'))
        for key, a, b in found[:10]:
            say('OVERLAP on %s: %s [%s %.3f-%s] and %s [%s %.3f-%s]' % (
                key, a.id, a.worker, a.start, a.end, b.id, b.worker, b.start, b.end))
        problems = []
        if found:
            problems.append('%d overlaps' % len(found))
        if lost:
            problems.append('%d lost tasks' % len(lost))
        if n_wasted:
            problems.append('%d wasted executions' % n_wasted)
        if bad_tokens:
            problems.append('fencing tokens out of order')
        return problems

    # ----------------------------------------------------------------- teardown
    def teardown(self):
        t = time.monotonic()
        stopped = self.stopped
        for w in self.workers:
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
                    conn.default_channel.queue_delete(self.queue)
                    conn.default_channel.exchange_delete(self.queue)
            except Exception:
                pass
        if self.records is not None:
            try:
                self.records.redis.delete(self.record_list)
            except Exception:
                pass
        if self.zk is not None:
            try:
                self.zk.close()
                stopped.append('ZooKeeper')
            except Exception as exc:
                say('could not stop ZooKeeper: %r' % (exc,))
        try:
            for name in brokers.stop_started():
                stopped.append({'rabbitmq': 'RabbitMQ', 'redis': 'Redis'}.get(name, name))
        except Exception as exc:
            say('could not stop the brokers the demo started: %r' % (exc,))
        if self.keep_workdir:
            say('worker logs kept in %s' % os.path.join(self.workdir, 'logs'))
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings['teardown'] = time.monotonic() - t
        return stopped


def _nodename(hostname):
    import socket
    host = socket.gethostname()
    return hostname.replace('%h', host).replace('%n', host.split('.')[0])


def _safe_url(url):
    return re.sub(r'//([^:/@]+):[^@/]*@', r'//\1:***@', url)


def _color_name(rgb):
    names = {(31, 119, 180): 'blue', (255, 127, 14): 'orange', (44, 160, 44): 'green',
             (148, 103, 189): 'purple', (140, 86, 75): 'brown', (227, 119, 194): 'pink',
             (127, 127, 127): 'grey', (188, 189, 34): 'olive', (23, 190, 207): 'cyan'}
    return names.get(tuple(rgb), 'rgb%s' % (tuple(rgb),))


def _terminate(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m integration.demo', description=(
        'Two real Celery workers on a contended workload, guarded by ZooKeeper mutexes.'))
    parser.add_argument('--quick', action='store_true',
                        help='a smaller workload (%d accounts x %d calls)' % (
                            QUICK['accounts'], QUICK['per_account']))
    parser.add_argument('--out', default='demo-timeline.png',
                        help='where to write the PNG timeline (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=None, help='seed of the shuffled workload')
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    demo = Demo(args)
    rc = 2
    problems = None
    try:
        demo.setup()
        demo.publish()
        demo.watch()
        demo.stop_workers()
        problems = demo.report()
        rc = 1 if problems else 0
    except KeyboardInterrupt:
        say('\ninterrupted: stopping everything the demo started')
        rc = 130
    except Exception as exc:
        say('\nthe demo could not run: %s' % (exc,))
        traceback.print_exc()
        rc = 2
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
        say('demo OK: every task ran exactly once, no two executions of one account overlapped')
    elif problems:
        say('demo FAILED: %s' % ', '.join(problems))
    return rc


if __name__ == '__main__':
    sys.exit(main())
