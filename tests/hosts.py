"""Hosts on one machine for multi-host tests: network namespaces joined by veth pairs.

Host A (the hub) is joined to each other host by a pair of its own, and to the test process by
one more. Every address is in 198.18.0.0/15, the range set aside for network tests, and exists
only on these pairs: the test process's end of its pair is the one outside the namespaces.
Each process a host runs gets a UTS namespace of its own named after the host, so its
`hostname` is the host's. Everything is removed on leaving the `Network` block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_LINK = "vbs-hub0"  # the test process's end of its pair to the hub
CLIENT_ADDRESS, HUB_FOR_CLIENT = "198.18.0.1", "198.18.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    name: str  # its host name
    netns: str
    hub_address: str  # the hub's address as this host reaches it
    link: str = ""  # the hub's end of this host's pair: taken down, it cuts the host off

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *argv]

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(pid) for pid in listed.stdout.split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process of the host at once, as a host that loses its power."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


class Network(contextlib.AbstractContextManager):
    """Hub host `hub` and the others of `names`, each on a pair of its own to the hub."""

    def __init__(self, hub: str, names: list[str]):
        tag = os.getpid() % 100000
        self.hub = Host(hub, f"vbs{tag}-{hub}", HUB_FOR_CLIENT)
        self.hosts = {name: Host(name, f"vbs{tag}-{name}", f"198.18.{i}.1", link=f"to-{name}")
                      for i, name in enumerate(names, start=1)}

    def __enter__(self) -> Network:
        with contextlib.suppress(subprocess.CalledProcessError):  # left by a run that was killed
            ip("link", "del", CLIENT_LINK)
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self) -> None:
        hub = self.hub.netns
        for host in (self.hub, *self.hosts.values()):
            ip("netns", "add", host.netns)
            ip("-n", host.netns, "link", "set", "lo", "up")
        ip("link", "add", CLIENT_LINK, "type", "veth", "peer", "name", "to-client", "netns", hub)
        ip("addr", "add", f"{CLIENT_ADDRESS}/30", "dev", CLIENT_LINK)
        ip("link", "set", CLIENT_LINK, "up")
        ip("-n", hub, "addr", "add", f"{HUB_FOR_CLIENT}/30", "dev", "to-client")
        ip("-n", hub, "link", "set", "to-client", "up")
        for i, host in enumerate(self.hosts.values(), start=1):
            ip("-n", hub, "link", "add", host.link, "type", "veth", "peer", "name", "to-hub", "netns", host.netns)
            ip("-n", hub, "addr", "add", f"{host.hub_address}/30", "dev", host.link)
            ip("-n", host.netns, "addr", "add", f"198.18.{i}.2/30", "dev", "to-hub")
            ip("-n", hub, "link", "set", host.link, "up")
            ip("-n", host.netns, "link", "set", "to-hub", "up")

    def cut(self, name: str) -> None:
        ip("-n", self.hub.netns, "link", "set", self.hosts[name].link, "down")

    def mend(self, name: str) -> None:
        ip("-n", self.hub.netns, "link", "set", self.hosts[name].link, "up")

    def __exit__(self, *exc_info) -> None:
        for host in (*self.hosts.values(), self.hub):
            host.kill_everything()
        for host in (*self.hosts.values(), self.hub):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", host.netns)  # takes its ends of the pairs, and so the pairs, with it
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", CLIENT_LINK)
