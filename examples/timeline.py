"""Timelines of executions per key: as text for a terminal, and as a picture (matplotlib).

Pure functions over executions: objects with ``key``, ``worker``, ``start`` and ``end``
attributes (``end`` None: never finished), e.g.
:class:`celery_mutex_bootstep.testing.records.Execution`.

``text_timeline(executions, width=70)`` gives one row per key, time on the x axis,
each execution drawn with its worker's letter: the first column of a bar is the
upper-case letter, the rest lower case (``AaaBbbAa``), so back-to-back executions stay
distinguishable; ``!`` marks columns where executions of one key really overlap in
time, ``?`` the end of an execution that never finished.

``plot_runs(panels, path)`` draws one row per task (grouped by key): the time it waited
after its worker received it (pale), then its run (in its worker's colour), overlapping
runs of one key in red; one panel per run, e.g. without and with the step.
"""
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ['letters_for', 'overlap_intervals', 'plot_runs', 'text_timeline']

# --------------------------------------------------------------------------- common


def _natural(key):
    """Sort 'acct-10' after 'acct-9'; None last."""
    if key is None:
        return (1, ())
    return (0, tuple((0, int(p)) if p.isdigit() else (1, p)
                     for p in re.split(r'(\d+)', str(key)) if p))


def letters_for(executions: Iterable, letters: Optional[Mapping[str, str]] = None
                ) -> Dict[str, str]:
    """Worker -> letter: the given mapping, then A, B, C... by sorted worker name."""
    out = dict(letters or {})
    free = (c for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' if c not in out.values())
    for worker in sorted({str(e.worker) for e in executions}):
        if worker not in out:
            out[worker] = next(free, '*')
    return out


def _span(executions):
    starts = [e.start for e in executions]
    ends = [e.end for e in executions if e.end is not None]
    t0 = min(starts)
    t1 = max(ends + starts)
    return t0, max(t1, t0 + 1e-3)


def _rows(executions):
    """key -> executions sorted by start, keys in natural order."""
    rows = {}
    for e in executions:
        rows.setdefault(e.key, []).append(e)
    return {k: sorted(rows[k], key=lambda e: e.start) for k in sorted(rows, key=_natural)}


def _overlapping(runs, t_end):
    """Index pairs (i, j) of runs (sorted by start) whose intervals intersect."""
    pairs = []
    for i, a in enumerate(runs):
        a_end = a.end if a.end is not None else t_end
        for j in range(i + 1, len(runs)):
            if runs[j].start >= a_end:
                break
            pairs.append((i, j))
    return pairs


def _cells(start, end, t0, scale, limit):
    """Half-open [c0, c1) of cells for [start, end): rounded, at least one cell."""
    c0 = min(max(int(round((start - t0) * scale)), 0), limit - 1)
    c1 = min(max(int(round((end - t0) * scale)), c0 + 1), limit)
    return c0, c1


# --------------------------------------------------------------------------- text

def text_timeline(executions: Iterable, width: int = 70, *,
                  letters: Optional[Mapping[str, str]] = None,
                  label_width: Optional[int] = None) -> str:
    """One row per key, ``width`` columns of time; see the module docstring."""
    executions = list(executions)
    if not executions:
        return '(no executions)\n'
    width = max(int(width), 10)
    letters = letters_for(executions, letters)
    t0, t1 = _span(executions)
    scale = width / (t1 - t0)
    rows = _rows(executions)
    labels = {k: '-' if k is None else str(k) for k in rows}
    lw = label_width or min(max(len(v) for v in labels.values()), 20)
    lines = []
    for key, runs in rows.items():
        cells = [' '] * width
        prev_c1, prev_end = None, None
        for e in runs:
            end = e.end if e.end is not None else t1
            c0, c1 = _cells(e.start, end, t0, scale, width)
            if prev_c1 is not None and e.start >= prev_end and c0 < prev_c1 < width:
                # rounding put a very short neighbour into the same column: shift
                c0, c1 = prev_c1, max(c1, prev_c1 + 1)
            if prev_end is None or end > prev_end:
                prev_c1, prev_end = c1, end
            letter = letters[str(e.worker)]
            for c in range(c0, c1):
                cells[c] = letter.upper() if c == c0 else letter.lower()
            if e.end is None:
                cells[c1 - 1] = '?'
        for i, j in _overlapping(runs, t1):
            a, b = runs[i], runs[j]
            a_end = a.end if a.end is not None else t1
            b_end = b.end if b.end is not None else t1
            c0, c1 = _cells(b.start, min(a_end, b_end), t0, scale, width)
            for c in range(c0, c1):
                cells[c] = '!'
        lines.append('%s |%s|' % (labels[key][:lw].rjust(lw), ''.join(cells)))
    # axis: a tick label roughly every 10 columns, at round steps of seconds
    step = _tick_step(t1 - t0, width / 10.0)
    axis = [' '] * (width + 8)
    for t in _ticks(t1 - t0, step):
        col = int(round(t * scale))
        label = _seconds(t, step)
        free = all(c == ' ' for c in axis[max(col - 1, 0):col + len(label)])
        if col + len(label) <= len(axis) and free:
            axis[col:col + len(label)] = list(label)
    lines.append('%s  %s' % (' ' * lw, ''.join(axis).rstrip()))
    present = {str(e.worker) for e in executions}
    legend = '   '.join('%s = %s' % (letter, worker)
                        for worker, letter in sorted(letters.items(), key=lambda kv: kv[1])
                        if worker in present)
    lines.append('%s  %s   (one column = %.2f s)' % (' ' * lw, legend, (t1 - t0) / width))
    return '\n'.join(lines) + '\n'


def _tick_step(span, max_ticks):
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if span / step <= max(max_ticks, 1):
            return step
    return 3600 * max(1, int(span / 3600 / max(max_ticks, 1)) + 1)


def _ticks(span, step):
    """0, step, 2*step, ... up to span (multiplied, not summed: no drift)."""
    return [k * step for k in range(int(span / step + 1e-9) + 1)]


def _seconds(t, step):
    return ('%gs' % round(t, 1)) if step < 1 else '%ds' % round(t)


# --------------------------------------------------------------------------- picture

OVERLAP_COLOR = '#d62728'   # red: two runs of one key at the same time
WORKER_COLORS = ('#1f77b4', '#2ca02c', '#9467bd', '#8c564b')  # no red, no orange-red


def overlap_intervals(executions: Sequence) -> Dict[int, List[Tuple[float, float]]]:
    """id(execution) -> [(start, end), ...] of the times it ran alongside another run of
    its key (both runs of every overlapping pair get the interval)."""
    out = {}
    for runs in _rows(executions).values():
        t_end = max([e.end for e in runs if e.end is not None] + [e.start for e in runs])
        for i, j in _overlapping(runs, t_end):
            a, b = runs[i], runs[j]
            end = min(a.end if a.end is not None else t_end, b.end if b.end is not None else t_end)
            for e in (a, b):
                out.setdefault(id(e), []).append((b.start, end))
    return out


def plot_runs(panels: Sequence[Tuple[str, Sequence, float]], path: str, *,
              letters: Optional[Mapping[str, str]] = None, title: Optional[str] = None,
              waits: Optional[Mapping[str, float]] = None) -> Tuple[int, int]:
    """Write a PNG with one panel per ``(heading, executions, t0)`` in *panels*.

    Each task gets a row, tasks grouped by key and ordered by start within a key, so
    serialised runs of one key form a staircase. *waits* maps an execution's task id to
    the time its worker received it (drawn as the pale bar before the run); *t0* is the
    panel's time zero (e.g. when the workload was published). Returns the figure size
    in pixels.
    """
    import matplotlib
    matplotlib.use('Agg')  # no display: the demo runs in terminals and containers
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    waits = waits or {}
    everything = [e for _, runs, _ in panels for e in runs]
    letters = letters_for(everything, letters)
    # by letter, so that worker A has one colour in every panel
    colors = {c: WORKER_COLORS[i % len(WORKER_COLORS)]
              for i, c in enumerate(sorted(set(letters.values())))}
    n_rows = max([len(runs) for _, runs, _ in panels] + [1])
    any_overlap = False
    x_max = max([(e.end if e.end is not None else e.start) - t0
                 for _, runs, t0 in panels for e in runs] + [1.0]) * 1.02
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 1.4 + 0.13 * n_rows),
                             squeeze=False)
    for ax, (heading, runs, t0) in zip(axes[0], panels):
        rows = _rows(runs)
        overlaps = overlap_intervals(runs)
        any_overlap = any_overlap or bool(overlaps)
        y, ticks, labels = 0, [], []
        for key, key_runs in rows.items():
            ticks.append(y + (len(key_runs) - 1) / 2)
            labels.append(str(key))
            for e in key_runs:
                color = colors[letters[str(e.worker)]]
                end = e.end if e.end is not None else e.start
                received = waits.get(e.id)
                if received is not None and received < e.start:
                    ax.barh(y, e.start - received, left=received - t0, height=0.8,
                            color=color, alpha=0.22, linewidth=0)
                ax.barh(y, max(end - e.start, 1e-3), left=e.start - t0, height=0.8,
                        color=color, linewidth=0)
                for o0, o1 in overlaps.get(id(e), ()):
                    ax.barh(y, o1 - o0, left=o0 - t0, height=0.8, color=OVERLAP_COLOR,
                            linewidth=0)
                y += 1
            y += 0.8  # a gap between two keys' groups
            ax.axhline(y - 0.9, color='#dddddd', linewidth=0.6)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(y - 0.5, -0.8)  # first key on top
        ax.set_xlim(0, x_max)  # one time scale in every panel, to compare them
        ax.set_xlabel('seconds since the tasks were published', fontsize=8)
        ax.tick_params(axis='x', labelsize=8)
        ax.set_title(heading, fontsize=10)
        for side in ('top', 'right'):
            ax.spines[side].set_visible(False)
    handles = [Patch(color=colors[c], label='run on worker %s' % c) for c in colors]
    handles.append(Patch(color='grey', alpha=0.25, label='waited after its worker received it'))
    if any_overlap:  # red appears nowhere else: a picture without overlaps has none
        handles.append(Patch(color=OVERLAP_COLOR,
                             label='ran alongside a run of the same account'))
    fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    size = fig.get_size_inches() * fig.dpi
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return int(round(size[0])), int(round(size[1]))
