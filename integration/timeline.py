"""Timelines of executions per key: as text for a terminal and as a PNG image.

Pure functions over executions: any objects with ``key``, ``worker``, ``start``
and ``end`` attributes (``end`` None: never finished), e.g.
:class:`integration.records.Execution`.

``text_timeline(executions, width=70)`` gives one row per key, time on the x axis,
each execution drawn with its worker's letter: the first column of a bar is the
upper-case letter, the rest lower case (``AaaBbbAa``), so back-to-back executions stay
distinguishable; ``!`` marks columns where executions of one key really overlap in
time, ``?`` the end of an execution that never finished.

``png_timeline(executions, path)`` writes an RGB PNG (standard library only: zlib +
struct, text in a built-in 5x7 bitmap font): one row per key, one bar per execution
coloured by worker, at least one background pixel between consecutive bars of a row,
overlapping parts in red, a time axis in seconds and a legend. ``read_png(path)``
decodes what it writes (for tests).
"""
import re
import struct
import zlib

__all__ = ['letters_for', 'png_size', 'png_timeline', 'read_png', 'text_timeline',
           'PALETTE', 'BACKGROUND', 'OVERLAP']

# --------------------------------------------------------------------------- common


def _natural(key):
    """Sort 'acct-10' after 'acct-9'; None last."""
    if key is None:
        return (1, ())
    return (0, tuple((0, int(p)) if p.isdigit() else (1, p)
                     for p in re.split(r'(\d+)', str(key)) if p))


def letters_for(executions, letters=None):
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

def text_timeline(executions, width=70, *, letters=None, label_width=None):
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


# --------------------------------------------------------------------------- bitmap font

# 5x7 glyphs, one hex byte per row (top to bottom), bit 4 = leftmost column;
# g p q y are drawn two dots lower, so that their last two rows are descenders.
_FONT_DATA = {
    '0': '0E 11 13 15 19 11 0E', '1': '04 0C 04 04 04 04 0E', '2': '0E 11 01 02 04 08 1F',
    '3': '1F 02 04 02 01 11 0E', '4': '02 06 0A 12 1F 02 02', '5': '1F 10 1E 01 01 11 0E',
    '6': '06 08 10 1E 11 11 0E', '7': '1F 01 02 04 08 08 08', '8': '0E 11 11 0E 11 11 0E',
    '9': '0E 11 11 0F 01 02 0C', 'A': '0E 11 11 1F 11 11 11', 'B': '1E 11 11 1E 11 11 1E',
    'C': '0E 11 10 10 10 11 0E', 'D': '1C 12 11 11 11 12 1C', 'E': '1F 10 10 1E 10 10 1F',
    'F': '1F 10 10 1E 10 10 10', 'G': '0E 11 10 17 11 11 0F', 'H': '11 11 11 1F 11 11 11',
    'I': '0E 04 04 04 04 04 0E', 'J': '07 02 02 02 02 12 0C', 'K': '11 12 14 18 14 12 11',
    'L': '10 10 10 10 10 10 1F', 'M': '11 1B 15 15 11 11 11', 'N': '11 11 19 15 13 11 11',
    'O': '0E 11 11 11 11 11 0E', 'P': '1E 11 11 1E 10 10 10', 'Q': '0E 11 11 11 15 12 0D',
    'R': '1E 11 11 1E 14 12 11', 'S': '0F 10 10 0E 01 01 1E', 'T': '1F 04 04 04 04 04 04',
    'U': '11 11 11 11 11 11 0E', 'V': '11 11 11 11 11 0A 04', 'W': '11 11 11 15 15 15 0A',
    'X': '11 11 0A 04 0A 11 11', 'Y': '11 11 11 0A 04 04 04', 'Z': '1F 01 02 04 08 10 1F',
    ' ': '00 00 00 00 00 00 00', '-': '00 00 00 1F 00 00 00', '.': '00 00 00 00 00 0C 0C',
    ':': '00 0C 0C 00 0C 0C 00', '_': '00 00 00 00 00 00 1F', '@': '0E 11 01 0D 15 15 0E',
    '/': '00 01 02 04 08 10 00', '(': '02 04 08 08 08 04 02', ')': '08 04 02 02 02 04 08',
    '=': '00 00 1F 00 1F 00 00', ',': '00 00 00 00 0C 04 08', '+': '00 04 04 1F 04 04 00',
    '!': '04 04 04 04 04 00 04', '?': '0E 11 01 02 04 00 04', '#': '0A 0A 1F 0A 1F 0A 0A',
    'a': '00 00 0E 01 0F 11 0F', 'b': '10 10 16 19 11 11 1E', 'c': '00 00 0E 10 10 11 0E',
    'd': '01 01 0D 13 11 11 0F', 'e': '00 00 0E 11 1F 10 0E', 'f': '06 09 08 1C 08 08 08',
    'g': '0F 11 11 11 0F 01 0E', 'h': '10 10 16 19 11 11 11', 'i': '04 00 0C 04 04 04 0E',
    'j': '02 00 06 02 02 12 0C', 'k': '10 10 12 14 18 14 12', 'l': '0C 04 04 04 04 04 0E',
    'm': '00 00 1A 15 15 11 11', 'n': '00 00 16 19 11 11 11', 'o': '00 00 0E 11 11 11 0E',
    'p': '1E 11 11 11 1E 10 10', 'q': '0F 11 11 11 0F 01 01', 'r': '00 00 16 19 10 10 10',
    's': '00 00 0E 10 0E 01 1E', 't': '08 08 1C 08 08 09 06', 'u': '00 00 11 11 11 13 0D',
    'v': '00 00 11 11 11 0A 04', 'w': '00 00 11 11 15 15 0A', 'x': '00 00 11 0A 04 0A 11',
    'y': '11 11 11 11 0F 01 0E', 'z': '00 00 1F 02 04 08 1F',
}
_FONT = {ch: [int(b, 16) for b in rows.split()] for ch, rows in _FONT_DATA.items()}
_DESCENDERS = frozenset('gpqy')  # drawn two dots lower: their last two rows hang below
_UNKNOWN = [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F]

SCALE = 2                      # font pixels per glyph dot
CHAR_W = 6 * SCALE             # advance: 5 dots + 1 spacing
CHAR_H = 7 * SCALE

# --------------------------------------------------------------------------- PNG layout

PAD = 10
TITLE_H = CHAR_H + 10
ROW_H = 26
BAR_H = 16
AXIS_H = 4 + 6 + CHAR_H + 6    # axis line gap, tick, label, gap
LEGEND_H = CHAR_H + 4
MAX_LABEL_CHARS = 12
DEFAULT_WIDTH = 800

BACKGROUND = (255, 255, 255)
ROW_SHADE = (243, 243, 243)
INK = (40, 40, 40)
GRID = (210, 210, 210)
OVERLAP = (214, 39, 40)        # reserved: never a worker colour
# tab10 without its red
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34),
           (23, 190, 207)]


def png_size(n_keys, width=DEFAULT_WIDTH):
    """(width, height) of the image png_timeline draws for ``n_keys`` rows."""
    return width, PAD + TITLE_H + max(n_keys, 1) * ROW_H + AXIS_H + LEGEND_H + PAD


class _Canvas:
    def __init__(self, width, height, color=BACKGROUND):
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(color) * width) for _ in range(height)]

    def rect(self, x0, y0, x1, y1, color):
        """Fill [x0, x1) x [y0, y1), clipped."""
        x0, x1 = max(0, int(x0)), min(self.width, int(x1))
        y0, y1 = max(0, int(y0)), min(self.height, int(y1))
        if x0 >= x1:
            return
        run = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            self.rows[y][3 * x0:3 * x1] = run

    def text(self, x, y, s, color=INK, max_x=None):
        """Draw ``s`` with the 5x7 font, top-left at (x, y); returns the next x."""
        limit = self.width if max_x is None else max_x
        for ch in str(s):
            if x + 5 * SCALE > limit:
                break
            glyph = _FONT.get(ch) or _FONT.get(ch.upper()) or _UNKNOWN
            for r, bits in enumerate(glyph, 2 if ch in _DESCENDERS else 0):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * SCALE, y + r * SCALE,
                                  x + (c + 1) * SCALE, y + (r + 1) * SCALE, color)
            x += CHAR_W
        return x

    def png(self):
        raw = b''.join(b'\x00' + bytes(row) for row in self.rows)  # filter 0 per row

        def chunk(kind, data):
            body = kind + data
            crc = zlib.crc32(body) & 0xFFFFFFFF
            return struct.pack('>I', len(data)) + body + struct.pack('>I', crc)

        ihdr = struct.pack('>IIBBBBB', self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
                + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))


def png_timeline(executions, path, *, width=DEFAULT_WIDTH, letters=None,
                 title='executions per key'):
    """Write the timeline PNG to ``path``; return its layout.

    The layout is a dict: ``width``, ``height``, ``rows`` (key -> (y0, y1) of its bar
    band, half-open), ``bars`` (one (key, x0, x1, colour) per execution, x half-open),
    ``colors`` (worker -> colour) and ``letters`` (worker -> letter).
    """
    executions = list(executions)
    rows = _rows(executions) if executions else {}
    width, height = png_size(len(rows), width)
    canvas = _Canvas(width, height)
    letters = letters_for(executions, letters)
    workers = sorted({str(e.worker) for e in executions}, key=lambda w: letters[w])
    colors = {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(workers)}
    labels = {k: ('-' if k is None else str(k))[:MAX_LABEL_CHARS] for k in rows}
    label_chars = max([len(v) for v in labels.values()] + [4])
    x_plot0 = PAD + label_chars * CHAR_W + 10
    x_plot1 = width - PAD - 2 * CHAR_W   # room for the last tick label
    plot_w = max(x_plot1 - x_plot0, 10)
    y_rows = PAD + TITLE_H
    layout = {'width': width, 'height': height, 'rows': {}, 'bars': [],
              'colors': colors, 'letters': {w: letters[w] for w in workers}}

    canvas.text(PAD, PAD, title or '')
    if not executions:
        canvas.text(x_plot0, y_rows + (ROW_H - CHAR_H) // 2, 'no executions')
        _write(path, canvas)
        return layout
    t0, t1 = _span(executions)
    scale = plot_w / (t1 - t0)

    # time grid behind the rows
    step = _tick_step(t1 - t0, plot_w / 70.0)
    ticks = [(x_plot0 + int(round(t * scale)), _seconds(t, step))
             for t in _ticks(t1 - t0, step)]
    rows_bottom = y_rows + len(rows) * ROW_H
    for i, key in enumerate(rows):
        y = y_rows + i * ROW_H
        if i % 2 == 0:
            canvas.rect(x_plot0, y, x_plot0 + plot_w, y + ROW_H, ROW_SHADE)
        canvas.text(PAD, y + (ROW_H - CHAR_H) // 2, labels[key], max_x=x_plot0 - 4)
    for x, _ in ticks:
        canvas.rect(x, y_rows, x + 1, rows_bottom, GRID)

    # bars: [x0, x1 - 1) so a background pixel separates consecutive executions
    for i, (key, runs) in enumerate(rows.items()):
        y0 = y_rows + i * ROW_H + (ROW_H - BAR_H) // 2
        y1 = y0 + BAR_H
        layout['rows'][key] = (y0, y1)
        prev_x1, prev_end = None, None
        for e in runs:
            end = e.end if e.end is not None else t1
            c0, c1 = _cells(e.start, end, t0, scale, plot_w)
            # two background pixels before the next bar when the bar is wide enough
            x0, x1 = x_plot0 + c0, x_plot0 + max(c1 - (2 if c1 - c0 > 4 else 1), c0 + 1)
            if prev_x1 is not None and e.start >= prev_end and x0 <= prev_x1:
                # a very short neighbour: keep one background pixel between them
                x0 = prev_x1 + 1
                x1 = max(x1, x0 + 1)
            if prev_end is None or end > prev_end:
                prev_x1, prev_end = x1, end
            color = colors[str(e.worker)]
            canvas.rect(x0, y0, x1, y1, color)
            if e.end is None:  # never finished: red frame top and bottom
                canvas.rect(x0, y0, x1, y0 + 2, OVERLAP)
                canvas.rect(x0, y1 - 2, x1, y1, OVERLAP)
            layout['bars'].append((key, x0, x1, color))
        for a, b in _overlapping(runs, t1):
            a_end = runs[a].end if runs[a].end is not None else t1
            b_end = runs[b].end if runs[b].end is not None else t1
            c0, c1 = _cells(runs[b].start, min(a_end, b_end), t0, scale, plot_w)
            canvas.rect(x_plot0 + c0, y0, x_plot0 + c1, y1, OVERLAP)

    # axis
    y_axis = rows_bottom + 4
    canvas.rect(x_plot0, y_axis, x_plot0 + plot_w, y_axis + 1, INK)
    last_label_end = -1
    for x, label in ticks:
        canvas.rect(x, y_axis, x + 1, y_axis + 6, INK)
        lx = x - (len(label) * CHAR_W) // 2
        if lx > last_label_end + CHAR_W // 2 and lx + len(label) * CHAR_W <= width:
            last_label_end = canvas.text(lx, y_axis + 9, label)

    # legend: a colour square and "A WORKER-NAME" per worker
    x = PAD
    y_legend = rows_bottom + AXIS_H
    for w in workers:
        if x + CHAR_H + 3 * CHAR_W > width - PAD:
            break
        canvas.rect(x, y_legend, x + CHAR_H, y_legend + CHAR_H, colors[w])
        name = '%s %s' % (letters[w], w)
        x = canvas.text(x + CHAR_H + 6, y_legend, name[:24], max_x=width - PAD) + 2 * CHAR_W
    _write(path, canvas)
    return layout


def _write(path, canvas):
    with open(path, 'wb') as f:
        f.write(canvas.png())


def read_png(path):
    """Decode a PNG written by png_timeline: (width, height, rows of (r, g, b) tuples).

    Only what png_timeline writes is supported: 8-bit RGB, no interlace, filter 0.
    """
    with open(path, 'rb') as f:
        data = f.read()
    if data[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError('not a PNG')
    pos, idat, width = 8, b'', None
    while pos < len(data):
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b'IHDR':
            width, height, depth, ctype, _, _, interlace = struct.unpack('>IIBBBBB', body)
            if (depth, ctype, interlace) != (8, 2, 0):
                raise ValueError('unsupported PNG format')
        elif kind == b'IDAT':
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        if line[0] != 0:
            raise ValueError('unsupported PNG filter %d' % line[0])
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(width)])
    return width, height, rows
