"""A real single-node SLURM for the tests (../shared/notes/slurm-single-node.md), started and stopped here.

`single_node_slurm` (session scope) needs root, `slurmctld`, `slurmd`, `sbatch` and `munged` (Debian:
`apt-get install slurm-wlm munge`, which `.ci/run` tries); without them it skips and says what is missing.
Everything it writes lives in a temporary directory: its own slurm.conf (found through SLURM_CONF, so
/etc/slurm is never touched), state, spool, logs, and two free TCP ports, so it cannot clash with a site's
SLURM or with another test session. munged is shared: one already running is used, else one is started.
Every daemon it started runs in the foreground as its child and is stopped by its PID at the end, after
its jobs are cancelled. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_requirements() -> list[str]:
    """Why a single-node SLURM cannot start here (empty: it can)."""
    missing = [f"{name} not found" for name in ("sbatch", "sinfo", "squeue", "scancel", "slurmctld", "slurmd", "munged", "munge", "unmunge")
               if _which(name) is None]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        missing.append("not root (slurmd must run as root)")
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """RealMemory for the node: half of this machine's, at most 4000 MB (dask-jobqueue asks --mem)."""
    total_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:"))  # fmt: skip
    return max(500, min(4000, total_kb // 2048))


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int, memory_mb: int) -> str:
    return "\n".join([
        "ClusterName=surveyinfertest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",  # no cgroups (containers, CI)
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        # RealMemory must be set: dask-jobqueue adds --mem, and with the default a job never schedules
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"  # fmt: skip


@dataclass
class SingleNodeSlurm:
    root: Path
    conf: Path
    env: dict[str, str]  # os.environ + SLURM_CONF: pass to every command that talks to this cluster
    cpus: int
    memory_mb: int

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        """The daemons' log tails: what a failing test prints."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def _munge_works() -> bool:
    try:
        encoded = subprocess.run([_which("munge"), "-n"], capture_output=True, timeout=10)
        decoded = subprocess.run([_which("unmunge")], input=encoded.stdout, capture_output=True, timeout=10)
    except (subprocess.TimeoutExpired, OSError, TypeError):
        return False
    return encoded.returncode == 0 and decoded.returncode == 0


def _start_munged(log: Path) -> subprocess.Popen | None:
    """Start munged (as user munge, foreground, our child) unless one already answers; None if reused."""
    if _munge_works():
        return None
    import pwd

    try:
        munge_user = pwd.getpwnam("munge")
    except KeyError as exc:
        raise RuntimeError("no munge user: install the munge package") from exc
    if not MUNGE_KEY.exists():
        subprocess.run([_which("mungekey") or "mungekey", "-c", "-f", "-k", str(MUNGE_KEY)], check=True, timeout=30)
        os.chown(MUNGE_KEY, munge_user.pw_uid, munge_user.pw_gid)
        MUNGE_KEY.chmod(0o400)
    MUNGE_SOCKET.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # /run/munge: missing without systemd
    os.chown(MUNGE_SOCKET.parent, munge_user.pw_uid, munge_user.pw_gid)
    process = subprocess.Popen([_which("munged"), "--foreground", "--force"], user=munge_user.pw_uid,
                               group=munge_user.pw_gid, stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"munged exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if _munge_works():
            return process
        time.sleep(0.2)
    _stop(process)
    raise RuntimeError(f"munged did not answer within {START_TIMEOUT_S} s")


def _stop(process: subprocess.Popen | None) -> None:
    """Stop one daemon we started, by its PID: SIGTERM, then SIGKILL after a timeout."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _wait_idle(cluster: SingleNodeSlurm, daemons: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        for name, process in daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{cluster.logs()}")
        try:
            state = cluster.run(_which("sinfo"), "-h", "-N", "-o", "%T", timeout=10).stdout.strip()
        except subprocess.TimeoutExpired:
            state = "sinfo timed out"
        if state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node is not idle after {START_TIMEOUT_S} s (sinfo: {state!r})\n{cluster.logs()}")


@contextlib.contextmanager
def started_slurm(root: Path) -> Iterator[SingleNodeSlurm]:
    """Start munged (if none answers), slurmctld and slurmd under ``root``; stop what was started at exit."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, _free_port(), _free_port(), cpus, _memory_mb()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SingleNodeSlurm(root, conf, env, cpus, _memory_mb())
    munged = slurmctld = slurmd = None
    try:
        munged = _start_munged(root / "munged.log")
        # -D: foreground, so each daemon is our child and its PID is the one we stop; -i: ignore stale state
        slurmctld = subprocess.Popen([_which("slurmctld"), "-D", "-i"], env=env, stdout=(root / "slurmctld.out").open("ab"),
                                     stderr=subprocess.STDOUT)  # fmt: skip
        slurmd = subprocess.Popen([_which("slurmd"), "-D", "-N", "localhost"], env=env,
                                  stdout=(root / "slurmd.out").open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
        _wait_idle(cluster, {"slurmctld": slurmctld, "slurmd": slurmd})
        yield cluster
    finally:
        if slurmctld is not None and slurmctld.poll() is None:
            try:  # this cluster's jobs only (SLURM_CONF), then give their steps a moment to end
                cluster.run(_which("scancel"), "-u", str(os.getuid()), timeout=10)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline and cluster.run(_which("squeue"), "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for process in (slurmd, slurmctld, munged):
            _stop(process)


@pytest.fixture(scope="session")
def single_node_slurm(tmp_path_factory):
    """A running single-node SLURM (slurmctld + slurmd on localhost), or a skip that says why not."""
    missing = missing_requirements()
    if missing:
        pytest.skip("no single-node SLURM here: " + "; ".join(missing) + " (apt-get install slurm-wlm munge)")
    manager = started_slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster = manager.__enter__()
    except Exception as exc:
        pytest.fail(f"single-node SLURM did not start: {exc}")
    try:
        yield cluster
    finally:
        manager.__exit__(None, None, None)
