"""The process's resident memory from Linux's counters, for the benchmark scripts."""

from __future__ import annotations


def status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in bytes, if Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux ``clear_refs``); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False
