"""Process control with psutil: whole-tree kills, and how a process ended, in words."""

from __future__ import annotations

import signal

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (vLLM's EngineCore children hold GPU memory)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, grace: float) -> list[int]:
    """SIGTERM the tree, wait up to `grace` seconds, SIGKILL what is left, and confirm it is gone.

    Returns the pids still alive afterwards (empty unless the kernel refused the kill).
    """
    tree = process_tree(pid)
    for process in tree:
        _send(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    # Children found only now (spawned during the grace period) go too.
    alive = list({p.pid: p for p in alive + [c for p in alive for c in _children(p)]}.values())
    for process in alive:
        _send(process, signal.SIGKILL)
    _, still_alive = psutil.wait_procs(alive, timeout=10)
    return [process.pid for process in still_alive]


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _send(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
        if signum == signal.SIGTERM:
            process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    except psutil.NoSuchProcess:
        pass


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
