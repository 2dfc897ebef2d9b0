"""Is a pool child still running? (Used before freeing a killed task's lease.)"""
from __future__ import annotations

import os

__all__ = ('process_alive',)


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    The pool reaps its children, so a killed child can linger briefly as a
    zombie: it runs no code any more, which is what matters here.
    """
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the last ')' (the command name may contain one).
    state = stat[stat.rfind(b')') + 2:stat.rfind(b')') + 3]
    return state not in (b'Z', b'X', b'x')
