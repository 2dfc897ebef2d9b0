"""Measurement helpers shared by the benchmark rows: CPU (psutil), medians and
percentiles, number formatting, the runner's log and the report's section marker."""
import math
import os
import statistics
import sys
import time

import psutil

# the kernel's CPU accounting tick: the smallest CPU time a process can be charged
CLK_TCK = os.sysconf('SC_CLK_TCK')


# a row of the report that is a section header, not a metric
SECTION = object()


class BenchError(RuntimeError):
    pass


def log(msg):
    print('[bench %s] %s' % (time.strftime('%H:%M:%S'), msg), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CPU (psutil)

def proc_cpu(pid, with_children=False):
    """utime+stime (plus those of reaped children) of *pid* in seconds; 0.0 if it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    total = t.user + t.system
    if with_children:
        total += t.children_user + t.children_system
    return total


def thread_cpu(pid, tid):
    """utime+stime of one thread of *pid* in seconds; 0.0 if it is gone."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return 0.0
    return next((t.user_time + t.system_time for t in threads if t.id == tid), 0.0)


def machine_cpu():
    """Busy CPU seconds of the whole machine (all cores)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def pids_named(*names):
    """Pids of the processes named one of *names* (e.g. the broker's)."""
    return [p.pid for p in psutil.process_iter(['name']) if p.info['name'] in names]


def tree_cpu(worker):
    """CPU seconds of a worker's whole process group: main + pool children.

    Children already reaped by the main process are in its cutime/cstime.
    """
    total = 0.0
    for pid in worker.group_pids():
        total += proc_cpu(pid, with_children=(pid == worker.pid))
    return total


# --------------------------------------------------------------------------- stats helpers

def median(xs):
    return statistics.median(xs) if xs else float('nan')


def pct(xs, q):
    """Nearest-rank percentile."""
    if not xs:
        return float('nan')
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


def fmt(x, digits=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return 'n/a'
    if isinstance(x, int):
        return str(x)
    return '%.*f' % (digits, x)


def fmt_range(values, digits=2):
    """'median (min-max)' when there are several values."""
    if not values:
        return 'n/a'
    m = fmt(median(values), digits)
    if len(values) > 1:
        return '%s (%s-%s)' % (m, fmt(min(values), digits), fmt(max(values), digits))
    return m
