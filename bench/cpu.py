"""CPU time of processes, for the benchmarks that charge a contender for its helpers' work too."""

from __future__ import annotations

import psutil


def postgres_processes() -> list[psutil.Process]:
    return [process for process in psutil.process_iter(["name"]) if process.info["name"] == "postgres"]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU used so far by these processes; one that has exited counts nothing."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
