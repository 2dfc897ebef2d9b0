"""Is a process running? Asked of psutil, not of the product's own
``process_alive``, so a bug there cannot vouch for itself."""
import psutil


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie runs no code)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
