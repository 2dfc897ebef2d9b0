"""``make demo`` end to end (quick workload), and the timeline drawings on synthetic data."""
import os
import re
import struct
import subprocess
import sys

from integration.demo import QUICK, max_concurrency, wasted
from integration.records import Execution
from integration.timeline import (OVERLAP, PALETTE, png_size, png_timeline, read_png,
                                  text_timeline)
from integration.workers import REPO_ROOT

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def ex(id, key, worker, start, end):
    return Execution(id, 'demo.sync_account', key, worker, 1, start, end, None, {})


# --------------------------------------------------------------------------- end to end

def test_quick_demo_runs_clean(tmp_path):
    out = tmp_path / 't.png'
    proc = subprocess.run(
        [sys.executable, '-m', 'integration.demo', '--quick', '--out', str(out)],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=180)
    text = proc.stdout.decode('utf-8', 'replace')
    assert proc.returncode == 0, text
    n_tasks = QUICK['accounts'] * QUICK['per_account']
    assert re.search(r'^tasks published:\s+%d$' % n_tasks, text, re.M), text
    assert re.search(r'^executions:\s+%d ' % n_tasks, text, re.M), text
    assert re.search(r'^overlaps:\s+0 ', text, re.M), text
    assert re.search(r'^wasted executions:\s+0$', text, re.M), text
    assert re.search(r'^lost tasks:\s+0$', text, re.M), text
    assert re.search(r'^\[\s*\d+\.\ds\] done +\d+/%d' % n_tasks, text, re.M), text  # progress
    assert 'demo OK' in text
    # one text timeline row per account
    rows = re.findall(r'^\s*(acct-\d+) \|(.*)\|$', text, re.M)
    assert sorted(k for k, _ in rows) == ['acct-%d' % (i + 1) for i in range(QUICK['accounts'])]
    assert sum(sum(c.isupper() for c in row) for _, row in rows) == n_tasks

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack('>II', data[16:24])  # IHDR follows the signature
    assert (width, height) == png_size(QUICK['accounts'])
    assert '(%dx%d;' % (width, height) in text


# --------------------------------------------------------------------------- drawings

WORKERS = ('w-a@host', 'w-b@host')


def synthetic():
    """Back-to-back executions (same and different worker), gaps and a tiny one."""
    a, b = WORKERS
    return [
        ex('1', 'acct-1', a, 100.0, 100.5),
        ex('2', 'acct-1', a, 100.5, 101.0),       # same worker, no gap at all
        ex('3', 'acct-1', b, 101.0, 101.3),       # other worker, no gap
        ex('4', 'acct-1', a, 101.3001, 101.302),  # shorter than a pixel
        ex('5', 'acct-1', b, 101.31, 102.0),
        ex('6', 'acct-2', b, 100.2, 100.9),
        ex('7', 'acct-2', b, 101.5, 103.0),
        ex('8', 'acct-10', a, 100.0, 103.0),      # natural order: after acct-2
    ]


def bar_runs(row, colors):
    """Maximal runs of bar-coloured pixels in a pixel row: (x0, x1, colour)."""
    runs, x = [], 0
    while x < len(row):
        if row[x] in colors:
            x0 = x
            while x < len(row) and row[x] == row[x0]:
                x += 1
            runs.append((x0, x, row[x0]))
        else:
            x += 1
    return runs


def test_png_bars_do_not_touch(tmp_path):
    path = tmp_path / 'synthetic.png'
    executions = synthetic()
    layout = png_timeline(executions, str(path))
    width, height, pixels = read_png(str(path))
    assert (width, height) == png_size(3) == (layout['width'], layout['height'])
    assert list(layout['rows']) == ['acct-1', 'acct-2', 'acct-10']
    colors = set(PALETTE) | {OVERLAP}
    assert layout['colors'] == {WORKERS[0]: PALETTE[0], WORKERS[1]: PALETTE[1]}
    for key, (y0, y1) in layout['rows'].items():
        runs_of_key = sorted((e for e in executions if e.key == key), key=lambda e: e.start)
        expected = [layout['colors'][e.worker] for e in runs_of_key]
        for y in range(y0, y1):
            runs = bar_runs(pixels[y], colors)
            # one run per execution, in order, each in its worker's colour:
            # consecutive bars are separated by at least one non-bar pixel
            assert [c for _, _, c in runs] == expected, (key, y, runs)
            for (_, a_end, _), (b_start, _, _) in zip(runs, runs[1:]):
                assert b_start > a_end
        # nothing bar-coloured just above or below the band
        assert not bar_runs(pixels[y0 - 1], colors) and not bar_runs(pixels[y1], colors)
    assert OVERLAP not in {p for row in pixels for p in row}


def test_png_marks_overlaps_in_red(tmp_path):
    a, b = WORKERS
    path = tmp_path / 'overlap.png'
    layout = png_timeline([ex('1', 'k', a, 0.0, 2.0), ex('2', 'k', b, 1.0, 3.0)], str(path))
    _, _, pixels = read_png(str(path))
    y0, y1 = layout['rows']['k']
    row = pixels[(y0 + y1) // 2]
    red = [x for x, p in enumerate(row) if p == OVERLAP]
    assert red and red == list(range(red[0], red[-1] + 1))
    plot = [x for x, p in enumerate(row) if p in set(PALETTE) | {OVERLAP}]
    span = plot[-1] - plot[0]
    assert abs((red[-1] - red[0]) - span / 3) <= 3  # the middle third overlaps


def test_png_without_executions(tmp_path):
    path = tmp_path / 'empty.png'
    png_timeline([], str(path))
    width, height, _ = read_png(str(path))
    assert (width, height) == png_size(0)


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


def test_demoapp_names_and_workload():
    env = dict(os.environ, DEMO_QUEUE='q-x', DEMO_BROKER='memory://')
    code = ('from integration import demoapp as d; '
            'print(d.QUEUE, d.sync_account.name, d.sync_account.mutex_keys, '
            'len(d.workload(5, 8, seed=1)), sorted(set(a for a, _ in d.workload(3, 2))))')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0, out.stdout
    assert out.stdout.decode().split('\n')[0] == \
        "q-x demo.sync_account ('account',) 40 ['acct-1', 'acct-2', 'acct-3']"
