"""Is a process running? Asked of ``ps``, not of the product's own
``process_alive``, so a bug there cannot vouch for itself."""
import subprocess


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie runs no code)."""
    out = subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)],
                         capture_output=True, text=True).stdout.strip()
    return bool(out) and not out.startswith(('Z', 'X'))
