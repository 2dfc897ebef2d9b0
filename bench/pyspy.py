"""--profile: where the row-1 worker's main process spends its CPU, from py-spy
(GIL-holding samples of all its threads) over one more unguarded and one more
guarded noop drain; summarised per thread and per gate entry point."""
import os
import shutil
import signal
import subprocess
import sys
import time

from bench.measure import log, proc_cpu, thread_cpu


def profile(bench):
    """py-spy (GIL-holding samples, all threads) of the row-1 worker's main
    process over one more unguarded and one more guarded noop drain."""
    spy = shutil.which('py-spy') or os.path.join(os.path.dirname(sys.executable), 'py-spy')
    if not os.path.exists(spy):
        bench.notes.append('--profile: py-spy not found (pip install py-spy)')
        return None
    w, n = bench.u_worker, bench.p['noop_n']
    out = {}
    for task, label in (('noop_plain', 'unguarded'), ('noop', 'gate')):
        log('profile: %d x %s under py-spy' % (n, task))
        q = bench.new_queue('prof-%s' % label)
        bench.publish(q, task, [('prof-%s-%d' % (label, i),) for i in range(n)])
        raw = os.path.join(bench.log_dir, 'py-spy-%s.txt' % label)
        proc = subprocess.Popen(
            [spy, 'record', '--pid', str(w.pid), '--rate', '250', '--format', 'raw',
             '--output', raw, '--threads', '--gil', '--nonblocking'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        main0, mt0 = proc_cpu(w.pid), thread_cpu(w.pid, w.pid)
        bench.consume(q, [w])
        runs = bench.wait_runs(q, n, [w], timeout=60 + n * 0.1)
        main1, mt1 = proc_cpu(w.pid), thread_cpu(w.pid, w.pid)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        bench.consume(q, [w], on=False)
        if not os.path.exists(raw):
            bench.notes.append('--profile: py-spy failed: %s' % err.decode(errors='replace')[-300:])
            return None
        out[label] = summarize_profile(raw)
        out[label]['main_cpu_ms'] = (main1 - main0) / n * 1000
        out[label]['main_thread_ms'] = (mt1 - mt0) / n * 1000
        out[label]['drain'] = max(r['e'] for r in runs) - min(r['s'] for r in runs)
    return out


def summarize_profile(path):
    """From py-spy raw output: GIL samples per thread; the main thread's samples
    split by the first celery_mutex_bootstep function on the stack (the gate's
    entry point; none = Celery/kombu's own work) and how many of those are
    inside kazoo."""
    import collections
    import re
    frame_re = re.compile(r'^(.*?) \((.*?):\d+\)$')
    threads = collections.Counter()
    entry = collections.Counter()
    in_kazoo = 0
    total = 0
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            stack, _, count = line.rstrip('\n').rpartition(' ')
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(';')
            name = frames[0].split(': ', 1)[-1]
            name = 'main' if name == 'MainThread' else (
                'kazoo connection' if 'zk_loop' in name else
                'kazoo callbacks' if '_thread_worker' in name else name)
            threads[name] += n
            total += n
            if name != 'main':
                continue
            first = None
            kz = False
            for fr in frames[1:]:
                m = frame_re.match(fr)
                if not m:
                    continue
                if first is None and 'celery_mutex_bootstep/' in m.group(2):
                    first = m.group(1)
                elif first is not None and 'kazoo/' in m.group(2):
                    kz = True
            entry[first or '(no gate frame)'] += n
            in_kazoo += n if kz else 0
    return {'total': total, 'threads': threads, 'entry': entry, 'in_kazoo': in_kazoo}


def profile_lines(prof):
    if not prof:
        return []
    lines = ['Profile of the row-1 worker main process (py-spy --gil --threads --nonblocking: '
             'samples of threads holding the GIL, shares of all such samples; approximate, '
             'the exact per-thread CPU from /proc is in the table):']
    for label, pr in prof.items():
        tot = float(max(pr['total'], 1))
        lines.append('- %s noop: drain %.2f s, main process CPU %.3f ms/task (consumer thread '
                     '%.3f); threads: %s' % (
            label, pr['drain'], pr['main_cpu_ms'], pr['main_thread_ms'], ', '.join(
                '%s %.0f%%' % (t, 100 * c / tot) for t, c in pr['threads'].most_common())))
        gate = {k: v for k, v in pr['entry'].items() if k != '(no gate frame)'}
        if gate:
            lines.append('  main thread in Celery/kombu %.0f%%, in the gate %.0f%% (%s); of '
                         'which inside kazoo calls %.0f%%' % (
                             100 * pr['entry'].get('(no gate frame)', 0) / tot,
                             100 * sum(gate.values()) / tot,
                             ', '.join('%s %.1f%%' % (k, 100 * v / tot) for k, v in
                                       sorted(gate.items(), key=lambda kv: -kv[1])[:6]),
                             100 * pr['in_kazoo'] / tot))
    return lines
