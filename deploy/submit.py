"""`survey-infer submit`: one batch job (SLURM sbatch or PBS qsub) that runs a whole `survey-infer run`.

For sites that forbid long-lived Dask schedulers on login nodes: the job starts its own cluster (LocalCluster,
or dask-cuda on a GPU node) on the node it is given and exits with the run's exit status. The script runs
the same Python as the command that wrote it, in the directory it was written from, so relative paths mean
what they meant there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from dask.utils import parse_bytes

from survey_infer.errors import RefusedError

SYSTEMS = ("slurm", "pbs")
SUBMIT_TIMEOUT_S = 60
_SLURM_JOB_ID = re.compile(r"Submitted batch job (\d+)")


def default_system() -> str:
    """slurm where sbatch is on PATH, else pbs where qsub is; refuse where neither is."""
    if shutil.which("sbatch"):
        return "slurm"
    if shutil.which("qsub"):
        return "pbs"
    raise RefusedError("submit: neither sbatch (SLURM) nor qsub (PBS) is on PATH; use --dry-run to see the script")


def _megabytes(memory: str) -> int:
    return max(1, -(-parse_bytes(memory) // 2**20))  # rounded up: never ask for less than was given


def batch_script(
    system: str,
    run_argv: list[str],
    *,
    cores: int = 1,
    memory: str = "4GB",
    walltime: str = "01:00:00",
    queue: str | None = None,
    account: str | None = None,
    gpus: int | None = None,
    job_name: str = "survey-infer",
    log_path: Path | None = None,
    setup: list[str] | tuple[str, ...] = (),
    workdir: Path | None = None,
    python: str | None = None,
    **_ignored,
) -> str:
    """The text of a batch script that runs ``survey-infer <run_argv>`` as one job."""
    if system not in SYSTEMS:
        raise RefusedError(f"unknown batch system {system!r}; choose one of {', '.join(SYSTEMS)}")
    if any(c.isspace() for c in job_name) or not job_name:
        raise RefusedError(f"--job-name {job_name!r} must be one word")
    mem_mb = _megabytes(memory)
    if system == "slurm":
        directives = [f"--job-name={job_name}", "--nodes=1", "--ntasks=1", f"--cpus-per-task={cores}",
                      f"--mem={mem_mb}M", f"--time={walltime}"]  # fmt: skip
        if queue:
            directives.append(f"--partition={queue}")
        if account:
            directives.append(f"--account={account}")
        if gpus:
            directives.append(f"--gres=gpu:{gpus}")
        if log_path is not None:
            directives.append(f"--output={log_path}")
        header = [f"#SBATCH {d}" for d in directives]
    else:
        select = f"select=1:ncpus={cores}:mem={mem_mb}mb" + (f":ngpus={gpus}" if gpus else "")
        header = [f"#PBS -N {job_name}", f"#PBS -l {select}", f"#PBS -l walltime={walltime}", "#PBS -j oe"]
        if queue:
            header.append(f"#PBS -q {queue}")
        if account:
            header.append(f"#PBS -A {account}")
        if log_path is not None:
            header.append(f"#PBS -o {log_path}")
    workdir = Path(workdir or os.getcwd()).resolve()
    command = [python or sys.executable, "-m", "survey_infer.cli", *run_argv]
    lines = [
        "#!/usr/bin/env bash",
        *header,
        "# Written by `survey-infer submit`: one job runs the whole `survey-infer run` below on its own node.",
        "set -eo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        *setup,
        # the run's own cluster may use every core the batch system gave the job
        f"export OMP_NUM_THREADS={cores}",
        "exec " + " ".join(shlex.quote(part) for part in command),
    ]
    return "\n".join(lines) + "\n"


def submit_script(system: str, script: Path, *, timeout: float = SUBMIT_TIMEOUT_S) -> str:
    """Submit ``script`` (sbatch or qsub) and return the job id the batch system printed."""
    command = ["sbatch", "--parsable", str(script)] if system == "slurm" else ["qsub", str(script)]
    if shutil.which(command[0]) is None:
        raise RefusedError(f"submit: {command[0]} is not on PATH (batch system {system}); the script is {script}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RefusedError(f"submit: {' '.join(command)} did not answer within {timeout:g} s") from exc
    if done.returncode != 0:
        raise RefusedError(f"submit: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    out = done.stdout.strip()
    if system == "slurm":
        match = _SLURM_JOB_ID.search(out)
        return match.group(1) if match else out.split(";")[0]  # --parsable: "id" or "id;cluster"
    return out
