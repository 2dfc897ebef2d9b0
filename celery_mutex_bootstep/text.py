"""Plain-text output shared by ``celery mutex`` and its waiting report: durations,
cut strings, aligned tables. No dependencies, so either side imports it."""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ('duration', 'cut', 'table')


def duration(seconds: Optional[float]) -> str:
    """``4.2s``, ``3m07s``, ``2h05m``; ``-`` when unknown."""
    if seconds is None:
        return '-'
    if seconds < 60:
        return f'{seconds:.1f}s'
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f'{minutes}m{secs:02d}s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h{minutes:02d}m'


def cut(text: str, width: int) -> str:
    """``text``, shortened with ``...`` to at most ``width`` characters."""
    return text if len(text) <= width else text[:width - 3] + '...'


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return '\n'.join(lines)
