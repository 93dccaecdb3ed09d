"""Which process on which machine holds something (a trial, a run), and whether it still runs.

A process killed with -9 closes nothing: what it held stays RUNNING. It is recorded with its
host, pid and start time (the start time tells a reused pid apart), so that the next process
on the same host can see it is gone. Another host's processes cannot be seen from here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def identity() -> dict:
    """This process: host, pid and start time."""
    return {"host": host(), "pid": os.getpid(), "start": start_time(os.getpid())}


def host() -> str:
    # PIPELINE_WORKER_HOST names the machine where hostnames repeat (containers started from
    # one image); the tests use it to stand for another machine.
    return os.environ.get("PIPELINE_WORKER_HOST") or socket.gethostname()


def start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_this_process(found: dict | None) -> bool:
    """Whether the recorded process is this one."""
    if not found or found.get("host") != host() or str(found.get("pid")) != str(os.getpid()):
        return False
    return str(found.get("start")) == str(start_time(os.getpid()))


def gone_from_this_host(found: dict | None) -> bool:
    """Whether the recorded process ran on this host and runs no more."""
    if not found or found.get("host") != host():
        return False  # another machine's process: only a heartbeat could tell
    pid = int(found["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return found.get("start") is not None and start_time(pid) != str(found.get("start"))
