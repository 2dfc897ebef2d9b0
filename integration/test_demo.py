"""``make demo`` end to end (quick workload), and the timelines on synthetic data."""
import os
import re
import subprocess
import sys

from celery_mutex_bootstep.testing.records import Execution
from examples.demo import QUICK
from examples.report import max_concurrency, received_times, wasted
from examples.timeline import OVERLAP_COLOR, overlap_intervals, plot_runs, text_timeline
from integration.workers import REPO_ROOT


def ex(id, key, worker, start, end):
    return Execution(id, 'demo.sync_account', key, worker, 1, start, end, None, {})


# --------------------------------------------------------------------------- end to end

def test_quick_demo_runs_clean(tmp_path):
    out = tmp_path / 't.png'
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)  # examples/ imports without the test harness on the path
    proc = subprocess.run(
        [sys.executable, '-m', 'examples.demo', '--quick', '--out', str(out)],
        cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=180)
    text = proc.stdout.decode('utf-8', 'replace')
    assert proc.returncode == 0, text
    n_tasks = QUICK['accounts'] * QUICK['per_account']
    assert re.search(r'^tasks:\s+%d ' % n_tasks, text, re.M), text
    prevented = re.search(r'^overlaps prevented:\s+(\d+) ', text, re.M)
    assert prevented and int(prevented.group(1)) > 0, text  # the contrast run overlapped
    assert re.search(r'^overlaps:\s+0 \(with the step\)$', text, re.M), text
    assert re.search(r'^wasted executions:\s+0$', text, re.M), text
    assert re.search(r'^lost tasks:\s+0$', text, re.M), text
    assert re.search(r'^time:\s+\d+\.\d s with the step, \d+\.\d s without', text, re.M), text
    assert re.search(r'^\[\s*\d+\.\ds\] done +\d+/%d' % n_tasks, text, re.M), text  # progress
    assert 'demo OK' in text
    # a text timeline row per account, for each run; one upper-case letter per execution
    guarded, _, unguarded = text.partition('without the step ("!"')
    for part, overlaps_expected in ((guarded, False), (unguarded, True)):
        rows = re.findall(r'^\s*(acct-\d+) \|(.*)\|$', part, re.M)
        assert sorted(k for k, _ in rows) == ['acct-%d' % (i + 1)
                                              for i in range(QUICK['accounts'])], part
        assert ('!' in ''.join(r for _, r in rows)) == overlaps_expected, part
    assert sum(c.isupper() for _, row in re.findall(r'^\s*(acct-\d+) \|(.*)\|$', guarded, re.M)
               for c in row) == n_tasks

    import matplotlib.image
    pixels = matplotlib.image.imread(str(out))
    size = re.search(r'^picture: .* \((\d+)x(\d+)\)$', text, re.M)
    assert size and (pixels.shape[1], pixels.shape[0]) == (int(size.group(1)),
                                                           int(size.group(2)))
    assert _has_color(pixels, OVERLAP_COLOR)  # the contrast run's overlaps are drawn red


# --------------------------------------------------------------------------- drawings

WORKERS = ('w-a@host', 'w-b@host')


def synthetic():
    """Back-to-back executions (same and different worker), gaps and a tiny one."""
    a, b = WORKERS
    return [
        ex('1', 'acct-1', a, 100.0, 100.5),
        ex('2', 'acct-1', a, 100.5, 101.0),       # same worker, no gap at all
        ex('3', 'acct-1', b, 101.0, 101.3),       # other worker, no gap
        ex('4', 'acct-1', a, 101.3001, 101.302),  # very short
        ex('5', 'acct-1', b, 101.31, 102.0),
        ex('6', 'acct-2', b, 100.2, 100.9),
        ex('7', 'acct-2', b, 101.5, 103.0),
        ex('8', 'acct-10', a, 100.0, 103.0),      # natural order: after acct-2
    ]


def _has_color(pixels, hex_color):
    rgb = tuple(int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    diff = abs(pixels[:, :, :3] - rgb).max(axis=2)
    return bool((diff < 0.02).any())


def test_overlap_intervals_only_where_runs_of_one_key_intersect():
    a, b = WORKERS
    back_to_back = synthetic()
    assert overlap_intervals(back_to_back) == {}
    x, y, z = ex('1', 'k', a, 0.0, 2.0), ex('2', 'k', b, 1.0, 3.0), ex('3', 'j', a, 0.5, 2.5)
    found = overlap_intervals([x, y, z])
    assert found == {id(x): [(1.0, 2.0)], id(y): [(1.0, 2.0)]}


def test_picture_red_only_with_overlaps(tmp_path):
    import matplotlib.image
    a, b = WORKERS
    clean, overlapping = tmp_path / 'clean.png', tmp_path / 'overlap.png'
    waits = {'6': 99.5}  # task 6 waited 0.7 s after its worker received it
    width, height = plot_runs([('clean', synthetic(), 99.0)], str(clean), waits=waits)
    pixels = matplotlib.image.imread(str(clean))
    assert (pixels.shape[1], pixels.shape[0]) == (width, height)
    assert not _has_color(pixels, OVERLAP_COLOR)
    plot_runs([('clean', synthetic(), 99.0),
               ('overlap', [ex('1', 'k', a, 0.0, 2.0), ex('2', 'k', b, 1.0, 3.0)], 0.0)],
              str(overlapping))
    assert _has_color(matplotlib.image.imread(str(overlapping)), OVERLAP_COLOR)


def test_received_times_take_the_last_delivery_to_the_worker_that_ran_it():
    a, b = WORKERS
    runs = [ex('1', 'x', a, 10.0, 11.0), ex('2', 'x', b, 11.0, 12.0), ex('3', 'y', a, 5, 6)]
    raw = [{'phase': 'received', 'id': '1', 't': 9.0, 'worker': a},
           {'phase': 'received', 'id': '2', 't': 9.5, 'worker': a},   # handed back...
           {'phase': 'received', 'id': '2', 't': 10.5, 'worker': b},  # ...run on b
           {'phase': 'received', 'id': '2', 't': 11.5, 'worker': b}]  # after the start
    assert received_times(raw, runs) == {'1': 9.0, '2': 10.5}


def test_text_timeline_rows_and_letters():
    executions = synthetic()
    text = text_timeline(executions, width=70)
    lines = text.splitlines()
    rows = [re.match(r'^\s*(\S+) \|(.*)\|$', line) for line in lines[:3]]
    assert [m.group(1) for m in rows] == ['acct-1', 'acct-2', 'acct-10']
    for m in rows:
        cells = m.group(2)
        assert len(cells) == 70
        assert '!' not in cells
        key_runs = sorted((e for e in executions if e.key == m.group(1)), key=lambda e: e.start)
        # every execution starts with its worker's upper-case letter
        starts = [c for c in cells if c.isupper()]
        assert starts == ['A' if e.worker == WORKERS[0] else 'B' for e in key_runs], cells
        # and continues in lower case of the same letter
        for bar in re.findall(r'[A-Z][a-z]*', cells):
            assert set(bar[1:]) <= {bar[0].lower()}
    assert '0s' in lines[3] and '3s' in lines[3]
    assert 'A = w-a@host' in lines[4] and 'B = w-b@host' in lines[4]


def test_text_timeline_marks_overlaps_and_unfinished():
    a, b = WORKERS
    text = text_timeline([ex('1', 'k', a, 0.0, 2.0), ex('2', 'k', b, 1.0, 3.0),
                          ex('3', 'j', a, 0.0, None)], width=30)
    rows = dict(re.findall(r'^\s*(\S+) \|(.*)\|$', text, re.M))
    assert rows['k'].count('!') == 10  # one third of 30 columns
    assert rows['j'].endswith('?') and rows['j'].startswith('A')


def test_counting_helpers():
    a, b = WORKERS
    runs = [ex('1', 'x', a, 0, 2), ex('2', 'y', b, 1, 3), ex('3', 'z', a, 2, 4),
            ex('3', 'z', b, 5, 6), ex('4', 'x', a, 6, None)]
    assert max_concurrency(runs) == 2  # an end and a start at the same instant do not add up
    assert wasted(runs)[0] == 2         # a duplicate run of task 3 and an unfinished one


def test_demoapp_names_workload_and_unguarded_mode():
    code = ('from examples import demoapp as d; '
            'print(d.QUEUE, d.sync_account.name, d.sync_account.mutex_keys, d.GUARDED, '
            '"MutexStep" in {s.__name__ for s in d.app.steps["consumer"]}, '
            'len(d.workload(5, 8, seed=1)), sorted(set(a for a, _ in d.workload(3, 2))))')
    for unguarded, expected in (('0', 'True True'), ('1', 'False False')):
        env = dict(os.environ, DEMO_QUEUE='q-x', DEMO_BROKER='memory://',
                   DEMO_UNGUARDED=unguarded)
        env.pop('PYTHONPATH', None)
        out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert out.returncode == 0, out.stdout
        assert out.stdout.decode().split('\n')[0] == (
            "q-x demo.sync_account ('account',) %s 40 ['acct-1', 'acct-2', 'acct-3']"
            % expected)
