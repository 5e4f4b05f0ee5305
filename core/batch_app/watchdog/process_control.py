"""Process control with psutil: whole-group kills, and how a process ended, in words.

Each worker starts in a session (and so a process group) of its own, whose id is its pid. The
group outlives the worker: vLLM's EngineCore children, which hold GPU memory, keep it after
their parent died and was reaped. So a worker is killed by its group, never by its pid alone,
and a slot is started again only once nothing of its old group is left.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from ..domain.statuses import DeathCause
from ..shutdown import FENCED_EXIT_CODE


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of the process group, with their descendants that left it (a zombie has
    exited: only its exit status is left, so it is not counted)."""
    members: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                for member in (process, *process.children(recursive=True)):
                    members[member.pid] = member
        except (ProcessLookupError, psutil.Error):
            continue
    return [member for member in members.values() if _alive(member)]


def kill_group(pgid: int, grace: float) -> list[int]:
    """SIGTERM the group, wait up to `grace` seconds, SIGKILL what is left, and confirm it is gone.

    Returns the pids still alive afterwards (empty unless the kernel refused the kill).
    """
    members = group_members(pgid)
    for process in members:
        _send(process, signal.SIGTERM)
        _send(process, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    _wait_gone(members, grace)
    # Members found only now (spawned during the grace period) go too.
    for process in group_members(pgid):
        _send(process, signal.SIGKILL)
    return [process.pid for process in _wait_gone(group_members(pgid), 10)]


def oom_kills() -> int | None:
    """Processes the kernel's OOM killer has killed so far: in this process's cgroup (v2, where
    the workers live too), else on the whole host; None where neither can be read."""
    counters = ["/proc/vmstat"]
    try:
        with open("/proc/self/cgroup") as cgroups:
            unified = next((line[3:].strip() for line in cgroups if line.startswith("0::")), "/")
        if unified != "/":
            counters.insert(0, f"/sys/fs/cgroup{unified}/memory.events")
    except OSError:
        pass
    for path in counters:
        try:
            with open(path) as lines:
                return next(int(line.split()[1]) for line in lines if line.startswith("oom_kill "))
        except (OSError, ValueError, StopIteration):
            continue
    return None


# Signals another process sends to end a worker, which say nothing of its requests (SIGKILL is
# the OOM killer's too: see death_cause).
_OUTSIDE_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def death_cause(exit_code: int, oom_kills_at_start: int | None) -> DeathCause:
    """Why a worker's process ended, from its exit status. The kernel's OOM killer sends SIGKILL,
    so a SIGKILL is an OOM kill when one happened since the worker started, or when that cannot
    be known; otherwise it came from outside, like SIGTERM, SIGINT and SIGHUP."""
    if exit_code >= 0:
        return {0: DeathCause.DRAINED, FENCED_EXIT_CODE: DeathCause.FENCED}.get(exit_code, DeathCause.EXITED)
    if -exit_code == signal.SIGKILL:
        now = oom_kills()
        if now is None or oom_kills_at_start is None or now > oom_kills_at_start:
            return DeathCause.OOM_KILLED
    return DeathCause.KILLED if -exit_code in _OUTSIDE_SIGNALS else DeathCause.CRASH_SIGNAL


def is_worker_group(pgid: int) -> bool:
    """Whether the group still holds a worker or server of ours or what it started (vLLM titles
    its EngineCore and worker processes `VLLM::...`)."""
    for process in group_members(pgid):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if any(mark in command for mark in ("core.batch_app.worker", "core.batch_app.vllm_server", "VLLM::",
                                            "multiprocessing")):
            return True
    return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited; reaping our own child is left
    to its Popen); returns those left."""
    deadline = time.monotonic() + timeout
    while (alive := [process for process in processes if _alive(process)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _send(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
