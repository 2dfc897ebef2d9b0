"""What the demo prints and draws after its runs: computed only from what the tasks and
the workers' consumers recorded in Redis (see :mod:`examples.demoapp`)."""
import collections
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from celery_mutex_bootstep.testing.records import by_key, overlaps
from examples.timeline import letters_for, plot_runs, text_timeline

__all__ = ['max_concurrency', 'received_times', 'report', 'say', 'token_order_violations',
           'wasted']


def say(*parts):
    print(*parts, flush=True)


def max_concurrency(executions: Sequence, now: Optional[float] = None) -> int:
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


def wasted(executions: Sequence) -> Tuple[int, list, int]:
    """Executions that did no useful work: never finished, or a second run of one task."""
    unfinished = [e for e in executions if e.end is None]
    finished = collections.Counter(e.id for e in executions if e.end is not None)
    duplicates = sum(n - 1 for n in finished.values() if n > 1)
    return len(unfinished) + duplicates, unfinished, duplicates


def token_order_violations(executions: Sequence) -> list:
    """Keys whose fencing tokens do not grow with the start time of their executions."""
    bad = []
    for key, runs in by_key(executions).items():
        tokens = [r.token for r in runs]
        if None in tokens or any(b <= a for a, b in zip(tokens, tokens[1:])):
            bad.append(key)
    return bad


def received_times(raw: Sequence[dict], executions: Sequence) -> Dict[str, float]:
    """Task id -> when the worker that ran it last received its message before the
    start (a message handed back to the broker is received again, maybe elsewhere)."""
    received = collections.defaultdict(list)
    for r in raw:
        if r.get('phase') == 'received':
            received[r['id']].append((r['t'], r['worker']))
    out = {}
    for e in executions:
        times = [t for t, worker in received.get(e.id, ()) if worker == e.worker and t <= e.start]
        if times:
            out[e.id] = max(times)
    return out


class _Outcome:
    """The numbers of one run."""

    def __init__(self, run):
        self.run = run
        self.executions = run.records.executions()
        self.ids = set(run.ids)
        self.lost = sorted(self.ids - {e.id for e in self.executions if e.end is not None})
        self.n_wasted, self.unfinished, self.duplicates = wasted(self.executions)
        self.overlaps = overlaps(self.executions)
        self.bad_tokens = token_order_violations(self.executions) if run.guarded else []
        self.received = received_times(run.records.raw(), self.executions)
        self.waits = [e.start - self.received[e.id] for e in self.executions
                      if e.id in self.received]
        self.letters = letters_for(self.executions,
                                   {w.nodename: w.letter for w in run.workers})


def report(runs: Sequence, size: dict, concurrency: int, out: str) -> List[str]:
    """Print the summary and the timelines, draw the picture; return the problems found
    in the guarded run (empty: the demo passed)."""
    guarded, unguarded = (_Outcome(run) for run in runs)
    n_tasks = len(guarded.ids)
    work = sum((e.end or e.start) - e.start for e in guarded.executions)

    say('')
    say('== summary ' + '=' * 60)
    say('tasks:                %d (%d accounts x %d calls of %.1f-%.1f s, shuffled; '
        '2 workers x %d processes)' % (n_tasks, size['accounts'], size['per_account'],
                                       size['durations'][0], size['durations'][1],
                                       concurrency))
    say('overlaps prevented:   %d (pairs of calls of one account that ran at once in the '
        'contrast run: the same tasks without the step)' % len(unguarded.overlaps))
    say('overlaps:             %d (with the step)' % len(guarded.overlaps))
    say('wasted executions:    %d%s' % (guarded.n_wasted, (
        ' (%d unfinished, %d duplicate runs)' % (len(guarded.unfinished), guarded.duplicates))
        if guarded.n_wasted else ''))
    say('lost tasks:           %d%s' % (len(guarded.lost), (
        ' (never completed; e.g. %s)' % ', '.join(guarded.lost[:3])) if guarded.lost else ''))
    say('time:                 %.1f s with the step, %.1f s without (%.1f s of work)' % (
        guarded.run.elapsed, unguarded.run.elapsed, work))
    if guarded.waits:
        say('waited for a key:     median %.2f s, max %.2f s (in the consumer, not in a pool '
            'process: at most %d ran at once)' % (
                statistics.median(guarded.waits), max(guarded.waits),
                max_concurrency(guarded.executions)))
    if guarded.bad_tokens:
        say('fencing tokens out of order for: %s' % ', '.join(map(str, guarded.bad_tokens)))
    for outcome, heading in ((guarded, 'with the step'),
                             (unguarded, 'without the step ("!": two runs of one account '
                                         'at once)')):
        say('')
        say('%s:' % heading)
        print(text_timeline(outcome.executions, width=70, letters=outcome.letters), end='',
              flush=True)

    waits = dict(guarded.received, **unguarded.received)
    letters = dict(guarded.letters, **unguarded.letters)
    panels = [('without the step: %d overlaps' % len(unguarded.overlaps),
               unguarded.executions, unguarded.run.published),
              ('with the step: 0 overlaps' if not guarded.overlaps else
               'with the step: %d overlaps' % len(guarded.overlaps),
               guarded.executions, guarded.run.published)]
    width, height = plot_runs(panels, out, letters=letters, waits=waits, title=(
        'celery-mutex-bootstep demo: %d tasks, one row each, grouped by account' % n_tasks))
    say('')
    say('picture: %s (%dx%d)' % (out, width, height))
    for key, a, b in guarded.overlaps[:10]:
        say('OVERLAP on %s: %s [%s %.3f-%s] and %s [%s %.3f-%s]' % (
            key, a.id, a.worker, a.start, a.end, b.id, b.worker, b.start, b.end))

    problems = []
    if guarded.overlaps:
        problems.append('%d overlaps' % len(guarded.overlaps))
    if guarded.lost:
        problems.append('%d lost tasks' % len(guarded.lost))
    if guarded.n_wasted:
        problems.append('%d wasted executions' % guarded.n_wasted)
    if guarded.bad_tokens:
        problems.append('fencing tokens out of order')
    return problems
