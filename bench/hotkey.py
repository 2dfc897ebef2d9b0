"""The hot-key rows (issue 9), each on workers of its own, and their report rows.

Row 5 / 5b / 5c, other keys behind a hot key, on a RabbitMQ classic queue, a
RabbitMQ quorum queue and Redis as broker: a backlog of tasks for one key is
published first, then one task for each of many other keys; how long until the
other keys' tasks are all done, guarded against unguarded (and, on the classic
queue, against the in-pool lock). The hot backlog is then dropped, not drained.

Row 6, spread: a few keys with a few tasks each on two small workers; a worker
that hoarded waiters for keys it cannot run would leave the other idle, so the
guarded drain is compared with the unguarded one.

``row_behind(bench)`` / ``row_spread(bench)`` run them with the helpers of
:class:`bench.run.Bench`; ``report_rows(res, p)`` and ``method_lines(p)`` format them.
"""
import json
import time

from bench.measure import SECTION, BenchError, fmt, fmt_range, log, median, pct, tree_cpu

# what the integration tests give their quorum queues
DELIVERY_LIMIT = 3

BROKERS = (
    # row, title, broker, quorum queue
    ('5', 'RabbitMQ classic queue', 'rabbitmq', False),
    ('5b', 'RabbitMQ quorum queue (x-delivery-limit %d)' % DELIVERY_LIMIT, 'rabbitmq', True),
    ('5c', 'Redis as broker', 'redis', False),
)


def _version(text):
    try:
        return tuple(int(x) for x in text.split('.')[:2])
    except ValueError:
        return (0, 0)


# --------------------------------------------------------------------------- row 5

def row_behind(bench):
    p = bench.p
    out = {}
    for row, title, broker, quorum in BROKERS:
        if quorum and _version(bench.versions.get('celery', '0')) < (5, 5):
            bench.notes.append('row %s skipped: Celery %s cannot consume from quorum queues' % (
                row, bench.versions.get('celery')))
            continue
        url = bench.broker if broker == 'rabbitmq' else bench.redis_broker
        qargs = {'x-queue-type': 'quorum', 'x-delivery-limit': DELIVERY_LIMIT} if quorum else None
        env = {'BENCH_ACKS_LATE': 1}
        if quorum:  # a quorum idle queue, so the workers use per-consumer QoS
            env.update(BENCH_QUEUE_TYPE='quorum', BENCH_DELIVERY_LIMIT=DELIVERY_LIMIT)
        log('row %s: %d x %.0f ms for one key, then %d other keys; %s, 2 workers -c 4' % (
            row, p['behind_hot'], p['behind_dur'] * 1000, p['behind_others'], title))
        workers = bench.start_workers(['k%s-1' % row, 'k%s-2' % row], concurrency=4, broker=url,
                                      idle='%s-idle-%s' % (bench.prefix, row), **env)
        bench.warm_up(workers, 'behind-%s' % row)
        # the in-pool lock only on the classic queue: its rejected hot messages go
        # back to the head of the queue, so it never reaches the other keys before
        # the whole hot backlog (minutes) is through; on a quorum queue each reject
        # counts against x-delivery-limit, so it would drop hot tasks instead
        variants = [('sleep_plain', 'plain'), ('sleep_guarded', 'gate')]
        if row == '5':
            variants.append(('sleep_inpool', 'inpool'))
        res = {label: [] for _, label in variants}
        for rep in range(p['behind_reps']):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for task, label in order:
                r = behind_phase(bench, workers, task, 'behind%s-%s-r%d' % (row, label, rep),
                                 qargs, cap=p['behind_cap'] if label == 'inpool' else None)
                res[label].append(r)
                log('  %-6s rep %d: %d/%d other keys done after %.2f s, %d hot tasks ran '
                    'before, deliveries %d (redelivered %d, unparked %d)' % (
                        label, rep, r['others_done'], p['behind_others'], r['done'],
                        r['hot_before'], r['deliveries'], r['redelivered'], r['unparked']))
        bench.stop_workers(workers)
        out[row] = res
    return out


def behind_phase(bench, workers, task, tag, qargs, cap=None):
    """Publish the hot backlog, then the other keys; consume until the other
    keys are all done (or *cap* seconds passed); then drop the rest."""
    p = bench.p
    n_hot, n_other, d = p['behind_hot'], p['behind_others'], p['behind_dur']
    client = workers[0].client
    q = bench.new_queue(tag, client=client, arguments=qargs)
    hot = '%s-hot' % tag
    others = ['%s-o%d' % (tag, i) for i in range(n_other)]
    bench.publish(q, task, [(hot, d)] * n_hot + [(k, d) for k in others], client=client)
    st0 = [bench.must_stats(w) for w in workers]
    cpu0 = [tree_cpu(w) for w in workers]
    t_consume = time.time()
    bench.consume(q, workers, arguments=qargs)
    # read only the new records: the list grows to thousands
    records, seen, done = '%s:%s' % (bench.records, q), 0, set()
    deadline = time.monotonic() + (cap if cap else 120 + 2 * n_hot * d)
    timed_out = False
    while len(done) < n_other:
        new = bench.redis.lrange(records, seen, -1)
        seen += len(new)
        done.update(r['k'] for r in map(json.loads, new) if r['k'] != hot)
        if len(done) >= n_other:
            break
        if time.monotonic() > deadline:
            if cap is None:
                raise BenchError('%s: %d of %d other keys done after %.0f s' % (
                    tag, len(done), n_other, 120 + 2 * n_hot * d))
            timed_out = True
            break
        for w in workers:
            if not w.is_running():
                raise BenchError('worker %s died:\n%s' % (w.node, w.log_tail(40)))
        time.sleep(0.05)
    t_stop = time.time()
    cpu1 = [tree_cpu(w) for w in workers]
    st1 = [bench.must_stats(w) for w in workers]
    bench.consume(q, workers, on=False)
    guarded = task == 'sleep_guarded'
    bench.quiesce(q, workers, park=[bench.park_queue(task, hot, client.bench_broker)]
                  if guarded else [])
    runs = bench.runs(q)
    other_runs = [r for r in runs if r['k'] != hot]
    t0 = min([r['s'] for r in runs] or [t_consume])
    last = t_stop if timed_out else max(r['e'] for r in other_runs)
    hot_runs = sorted((r for r in runs if r['k'] == hot), key=lambda r: r['s'])
    overlaps = sum(1 for a, b in zip(hot_runs, hot_runs[1:]) if b['s'] < a['e'])
    # the hot key's longest idle time before then (a pause still on at `last` counts)
    before = [r for r in hot_runs if r['s'] < last]
    pauses = [b['s'] - a['e'] for a, b in zip(before, before[1:])]
    pauses += [last - max(r['e'] for r in before)] if before else []
    if overlaps and task != 'sleep_plain':
        bench.notes.append('%s: %d overlapping executions of the hot key!' % (tag, overlaps))

    def delta(i):
        return sum(b['deliveries'].get(q, [0, 0, 0])[i] - a['deliveries'].get(q, [0, 0, 0])[i]
                   for a, b in zip(st0, st1))

    def counter(name):
        return sum(b['gate'].get(name, 0) - a['gate'].get(name, 0) for a, b in zip(st0, st1))
    return {
        'done': last - t0, 'timed_out': timed_out, 'others_done': len(done),
        'hot_before': len(before), 'hot_pause': max(pauses + [0.0]),
        'deliveries': delta(0), 'redelivered': delta(1), 'unparked': delta(2),
        'published': n_hot + n_other, 'parked': counter('parked'),
        'unparked_ops': counter('unparked'), 'cpu': sum(cpu1) - sum(cpu0),
    }


# --------------------------------------------------------------------------- row 6

def row_spread(bench):
    p = bench.p
    k, t, d = p['spread_keys'], p['spread_per_key'], p['spread_dur']
    log('row 6: %d keys x %d tasks x %.2f s, 2 workers -c 2' % (k, t, d))
    workers = bench.start_workers(['s1', 's2'], concurrency=2, BENCH_COUNT_ENTRIES=1)
    bench.warm_up(workers, 'spread')
    variants = [('sleep_plain', 'plain'), ('sleep_inpool', 'inpool'), ('sleep_guarded', 'gate')]
    out = {label: [] for _, label in variants}
    for rep in range(p['spread_reps']):
        order = variants[rep % 3:] + variants[:rep % 3]
        for task, label in order:
            r = bench.contended_phase(workers, task, 'spread-%s-r%d' % (label, rep),
                                      keys=k, per_key=t, dur=d)
            # which worker ran each execution (pool pids are stable: no max-tasks)
            owner = {pid: i for i, w in enumerate(workers) for pid in w.child_pids()}
            runs = r.pop('runs')
            r['per_worker'] = [sum(1 for x in runs if owner.get(x['p']) == i)
                               for i in range(len(workers))]
            out[label].append(r)
            log('  %-6s rep %d: drain %.2f s, executions per worker %s, entries %d' % (
                label, rep, r['drain'], r['per_worker'], r['entries']))
            if r['overlaps'] and label != 'plain':
                bench.notes.append('spread %s rep %d: %d overlapping executions of one key!' % (
                    label, rep, r['overlaps']))
    bench.stop_workers(workers)
    return out


# --------------------------------------------------------------------------- report

def report_rows(res, p):
    rows = []
    for row, title, _, _ in BROKERS:
        v = res.get('behind', {}).get(row)
        if v is not None:
            rows += _behind_rows(row, title, v, p)
    if 'spread' in res:
        rows += _spread_rows(res['spread'], p)
    return rows


def _cells(v, fn, digits=0):
    """One cell per column (unguarded, in-pool, gate): fn over the reps, median (min-max)."""
    return tuple(fmt_range([fn(r) for r in v[label]], digits) if label in v else ''
                 for label in ('plain', 'inpool', 'gate'))


def _behind_rows(row, title, v, p):
    n_other = p['behind_others']
    rows = [(row, SECTION, 'Other keys behind a hot key, %s: %d x %.0f ms for one key published '
             'first, then %d x %.0f ms on %d other keys; 2 workers -c 4, task_acks_late '
             '(ratio = gate / unguarded; goal <= 1.5)' % (
                 title, p['behind_hot'], p['behind_dur'] * 1000, n_other,
                 p['behind_dur'] * 1000, n_other))]
    plain, gate = median([r['done'] for r in v['plain']]), median([r['done'] for r in v['gate']])
    ratio = 'gate / unguarded %s' % fmt(gate / plain)
    done = list(_cells(v, lambda r: r['done'], 2))
    if 'inpool' in v:
        ip = v['inpool']
        if any(r['timed_out'] for r in ip):
            done[1] = '> %.0f s (%s of %d done)' % (
                p['behind_cap'], '/'.join(str(r['others_done']) for r in ip), n_other)
            ratio += ' (in-pool > %s)' % fmt(p['behind_cap'] / plain)
        else:
            ratio += ' (in-pool %s)' % fmt(median([r['done'] for r in ip]) / plain)
    rows.append((row, 'time until the %d other-key tasks were all done, s (from the first '
                 'execution)' % n_other, done[0], done[1], done[2], ratio))
    rows.append((row, 'hot-key tasks that ran before then',) +
                _cells(v, lambda r: r['hot_before']) + ('',))
    rows.append((row, 'longest pause of the hot key before then, s',) +
                _cells(v, lambda r: r['hot_pause'], 2) + ('',))
    rows.append((row, 'deliveries beyond one per message until then: redelivered / unparked '
                 'copies',) + tuple(
                     ('%s / %s' % (fmt_range([r['redelivered'] for r in v[label]], 0),
                                   fmt_range([r['unparked'] for r in v[label]], 0))
                      if label in v else '') for label in ('plain', 'inpool', 'gate')) + ('',))
    rows.append((row, 'hot messages parked / unparked until then (gate counters)', '', '',
                 '%s / %s' % (fmt_range([r['parked'] for r in v['gate']], 0),
                              fmt_range([r['unparked_ops'] for r in v['gate']], 0)), ''))
    rows.append((row, 'CPU of both worker trees until then, s',) +
                _cells(v, lambda r: r['cpu'], 2) + ('',))
    return rows


def _spread_rows(v, p):
    k, t, d = p['spread_keys'], p['spread_per_key'], p['spread_dur']
    limit = max(k * t * d / 4, t * d)  # 4 pool processes; one key's tasks run in turn
    rows = [('6', SECTION, 'Spread, no hoarding: %d keys x %d tasks x %.0f ms (published '
             'interleaved), 2 workers -c 2 (physical limit %.1f s; ratio = gate / unguarded; '
             'goal <= 1.1)' % (k, t, d * 1000, limit))]
    med = {label: median([r['drain'] for r in v[label]]) for label in v}
    rows.append(('6', 'drain time, s',) + _cells(v, lambda r: r['drain'], 2) + (
        'gate / unguarded %s (in-pool %s)' % (fmt(med['gate'] / med['plain']),
                                               fmt(med['inpool'] / med['plain'])),))
    rows.append(('6', 'executions per worker (first rep)',) + tuple(
        '/'.join(str(x) for x in v[label][0]['per_worker'])
        for label in ('plain', 'inpool', 'gate')) + ('',))
    rows.append(('6', 'pool entries that did not execute',) +
                _cells(v, lambda r: r['entries'] - r['executions']) + ('',))
    rows.append(('6', 'deliveries beyond one per message: redelivered / unparked copies',) + tuple(
        '%s / %s' % (fmt_range([r['redelivered'] for r in v[label]], 0),
                     fmt_range([r['unparked'] for r in v[label]], 0))
        for label in ('plain', 'inpool', 'gate')) + ('',))
    gaps = {label: [g for r in v[label] for g in r['gaps']] for label in ('inpool', 'gate')}
    rows.append(('6', 'handover gap, same key, median / p99, ms', '') + tuple(
        '%s / %s' % (fmt(median(gaps[label]) * 1000, 0), fmt(pct(gaps[label], 99) * 1000, 0))
        for label in ('inpool', 'gate')) + ('',))
    return rows


def method_lines(p, rows):
    out = []
    if '5' in rows:
        out.append(
            '- Rows 5/5b/5c: %d tasks for one key, then %d for %d other keys (all %.0f ms) are '
            'published to a fresh queue, then both workers consume it; time = last other-key '
            'end - first execution start, from the records; then the workers stop consuming '
            'and the queue and the hot key\'s park queue are purged (the hot backlog is not '
            'drained). %d rep(s); the in-pool lock only on the classic queue, stopped after '
            '%.0f s.' % (p['behind_hot'], p['behind_others'], p['behind_others'],
                         p['behind_dur'] * 1000, p['behind_reps'], p['behind_cap']))
    if '6' in rows:
        out.append(
            '- Row 6: as rows 2/2b, on two workers -c 2; median (min-max) of %d rep(s), order '
            'rotated.' % p['spread_reps'])
    return out
