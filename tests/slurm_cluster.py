"""A one-node SLURM cluster for the tests, run as root under a scratch folder: its own munged
(socket and key of its own), slurmctld and slurmd on free ports, torn down by pid afterwards.
SLURM's client commands find it through SLURM_CONF, which `env` carries."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from .conftest import cannot_run, free_port, require_tool

# Debian puts the daemons in /usr/sbin, which a non-login PATH may lack.
SBIN = ("/usr/sbin", "/sbin")


def _tool(name: str, package: str) -> str:
    for folder in SBIN:
        if os.access(path := f"{folder}/{name}", os.X_OK):
            return path
    return require_tool(name, package=package)


class SlurmCluster:
    def __init__(self, root: Path):
        if os.geteuid() != 0:
            cannot_run("the test SLURM cluster runs its daemons as root")
        self.root = root
        self.node = socket.gethostname()
        self.munged, self.slurmctld, self.slurmd = (_tool("munged", "munge"), _tool("slurmctld", "slurmctld"),
                                                    _tool("slurmd", "slurmd"))
        require_tool("sbatch", package="slurm-client")
        self.conf = root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> SlurmCluster:
        root = self.root
        for folder in ("state", "spool", "munge"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        key, munge_socket = root / "munge" / "munge.key", root / "munge" / "munge.socket"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        os.chown(root / "munge", 0, 0)
        self._daemon([self.munged, "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                      f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'munge' / 'munged.log'}",
                      f"--seed-file={root / 'munge' / 'munged.seed'}"], "munged.out")
        self._wait(munge_socket.exists, 20, "munged's socket")
        self.conf.write_text(f"""\
ClusterName=tests
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=tests Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon([self.slurmctld, "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._daemon([self.slurmd, "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait(lambda: self.run("sinfo", "--noheader", "--format=%T", check=False).stdout.strip() == "idle",
                   60, "sinfo to show the node idle")
        return self

    def _daemon(self, command: list[str], log_name: str) -> None:
        with open(self.root / log_name, "ab") as out:
            self.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode} while waiting for {what}; "
                                       f"see {self.root}")
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}; see {self.root}")

    def run(self, *command: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scancel, scontrol, sinfo) against this cluster."""
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=60, check=False,
                                env={**self.env, **(env or {})})
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as fields (JobState, ExitCode, ...); {} once SLURM has forgotten it."""
        result = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        fields = {}
        for part in result.stdout.split():
            key, sep, value = part.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons, newest first, by their pids."""
        self.run("scancel", "--me", check=False)
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
