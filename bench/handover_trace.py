"""Where a hot key's handover goes: the segments between one holder's end and the
next holder's start, from a run traced by ``bench/tracing/sitecustomize.py``.

    make bench-trace          # row 2c/2d traced, then this report

A handover is two consecutive tasks of one key run by the same worker, with no
other worker's task between them (those are the 2-worker row's races). For each,
the chain ``postrun -> release -> send (the delete) -> fire (the next waiter's
watch) -> wake -> send (its create) -> answered -> grant -> prerun`` is matched
by time and each segment's median and 90th percentile printed; handovers over
10 ms are attributed to their longest segment, or to a lost race (a create
answered ``contended`` on the way). The trace's own cost is in the figures
(a few microseconds per event).
"""
import bisect
import collections
import glob
import json
import os
import statistics
import sys

CHAIN = ('release', 'send', 'fire', 'wake', 'send', 'answered', 'grant')
SLOW = 0.010


def load(trace_dir):
    pool = collections.defaultdict(dict)
    for path in glob.glob(os.path.join(trace_dir, 'pool-*.txt')):
        with open(path) as f:
            for line in f:
                t, name, task_id = line.split()
                pool[task_id][name] = float(t)
    workers = {}
    for path in glob.glob(os.path.join(trace_dir, '[0-9]*.json')):
        with open(path) as f:
            workers[os.path.basename(path)[:-5]] = sorted(map(tuple, json.load(f)))
    return pool, workers


def handovers(pool, workers):
    """(worker, events, previous task id, next task id), in start order."""
    starts = []
    for pid, events in workers.items():
        for t, name, detail in events:
            if name == 'grant' and 'prerun' in pool.get(detail, {}):
                starts.append((pool[detail]['prerun'], pid, detail))
    starts.sort()
    for (_, pid0, prev), (_, pid1, nxt) in zip(starts, starts[1:]):
        if pid0 == pid1 and 'postrun' in pool[prev]:
            yield pid0, prev, nxt


def segments(events, times, end, start):
    """The matched chain between ``end`` and ``start`` (None if it does not match)."""
    at, marks = end, [end]
    by_name = collections.defaultdict(list)
    for t, name, _ in events[bisect.bisect_left(times, end):bisect.bisect_right(times, start)]:
        by_name[name].append(t)
    for name in CHAIN:
        xs = by_name.get(name, [])
        i = bisect.bisect_left(xs, at)
        if i == len(xs):
            return None
        at = xs[i]
        marks.append(at)
    marks.append(start)
    return [b - a for a, b in zip(marks, marks[1:])]


def report(trace_dir):
    pool, workers = load(trace_dir)
    times = {pid: [e[0] for e in ev] for pid, ev in workers.items()}
    labels = ['postrun -> release', 'release -> send', 'send -> watch fired',
              'fired -> consumer wakes', 'wake -> create sent', 'create -> answered',
              'answered -> grant', 'grant -> prerun']
    gaps, chains, slow = [], [], collections.Counter()
    for pid, prev, nxt in handovers(pool, workers):
        end, start = pool[prev]['postrun'], pool[nxt]['prerun']
        if not 0 < start - end < 1.0:
            continue
        gaps.append(start - end)
        ev, ts = workers[pid], times[pid]
        chain = segments(ev, ts, end, start)
        if chain is not None:
            chains.append(chain)
        if start - end > SLOW:
            window = ev[bisect.bisect_left(ts, end):bisect.bisect_right(ts, start)]
            if any(name == 'answered' and detail == 'contended' for _, name, detail in window):
                slow['a create lost (contended), retried'] += 1
            elif chain is not None:
                slow[labels[max(range(len(chain)), key=chain.__getitem__)]] += 1
            else:
                slow['unmatched'] += 1
    if not gaps:
        sys.exit('no handovers traced in %s' % trace_dir)
    gaps.sort()

    def ms(xs, q):
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, int(len(xs) * q))]
    print('%d handovers (postrun -> prerun): median %.2f, p90 %.2f, p99 %.2f ms' % (
        len(gaps), 1000 * statistics.median(gaps), ms(gaps, .9), ms(gaps, .99)))
    print('%d with the whole chain matched; per segment, median / p90 ms:' % len(chains))
    for i, label in enumerate(labels):
        xs = [c[i] for c in chains]
        print('  %-26s %6.2f / %6.2f' % (label, 1000 * statistics.median(xs), ms(xs, .9)))
    print('over %.0f ms: %d, by longest segment: %s' % (
        1000 * SLOW, sum(slow.values()), ', '.join('%s %d' % kv for kv in slow.most_common())))


if __name__ == '__main__':
    report(sys.argv[1] if len(sys.argv) > 1 else 'bench-trace')
