"""Measurement helpers shared by the benchmark rows: CPU from /proc, medians and
percentiles, number formatting, the runner's log and the report's section marker."""
import math
import os
import statistics
import sys
import time

CLK_TCK = os.sysconf('SC_CLK_TCK')

# a row of the report that is a section header, not a metric
SECTION = object()


class BenchError(RuntimeError):
    pass


def log(msg):
    print('[bench %s] %s' % (time.strftime('%H:%M:%S'), msg), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc

def _stat_fields(pid):
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b')') + 2:].split()


def proc_cpu(pid, with_children=False):
    """utime+stime (plus cutime+cstime) of *pid* in seconds; 0.0 if it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if with_children:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def thread_cpu(pid, tid):
    """utime+stime of one thread of *pid* in seconds; 0.0 if it is gone."""
    try:
        with open('/proc/%d/task/%d/stat' % (pid, tid), 'rb') as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rfind(b')') + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu():
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    with open('/proc/stat', encoding='ascii') as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def pids_named(*names):
    """Pids whose /proc/<pid>/comm is one of *names* (e.g. the broker's)."""
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/comm' % entry, encoding='utf-8') as f:
                    if f.read().strip() in names:
                        out.append(int(entry))
            except OSError:
                pass
    return out


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
