"""Clusters (issue 13): --cluster local|cuda|slurm|pbs checked on construction, dask-jobqueue job scripts,
`survey-infer submit` scripts, and a real single-node SLURM running a whole run (skipped where it cannot start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dask
import pytest

from survey_infer.cli import main
from survey_infer.cluster import INHERIT_CONFIG_VARIABLE, WORKER_CONFIG, jobqueue_cluster, worker_config_prologue
from survey_infer.config import RunConfig
from survey_infer.errors import RefusedError
from tests.conftest import assert_exactly_once
from tests.slurm_fixture import single_node_slurm  # noqa: F401  (the session fixture)

RUN_TIMEOUT_S = 90  # a hung scheduler or a job that never starts fails the test instead of hanging it


def config(tmp_path: Path, **kwargs) -> RunConfig:
    return RunConfig(task="mass_to_light", input=tmp_path / "in.zarr", output=tmp_path / "out", **kwargs)


# ---------------------------------------------------------------- RunConfig: typed and checked

@pytest.mark.parametrize("kwargs, message", [
    ({"cluster": "kubernetes"}, "unknown cluster 'kubernetes'"),
    ({"cluster": "slurm", "jobs": 0}, "--jobs must be a positive integer"),
    ({"cluster": "pbs", "cores": -2}, "--cores must be a positive integer"),
    ({"cluster": "slurm", "cores": True}, "--cores must be a positive integer"),
    ({"cluster": "slurm", "memory": "lots"}, "--memory 'lots' is not an amount"),
    ({"cluster": "slurm", "walltime": "2 hours"}, "--walltime '2 hours' is not"),
    ({"cluster": "slurm", "queue": "a b"}, "--queue 'a b' must be one word"),
    ({"cluster": "slurm", "worker_wait": 0}, "--worker-wait must be > 0"),
    ({"jobs": 2}, "--jobs: only for --cluster slurm or pbs"),
    ({"cluster": "cuda", "memory": "4GB", "account": "x"}, "--memory, --account: only for --cluster slurm or pbs"),
    ({"cluster": "slurm", "scheduler": "tcp://h:8786"}, "cannot be combined with --cluster slurm"),
])  # fmt: skip
def test_cluster_options_are_refused_clearly(tmp_path, kwargs, message):
    with pytest.raises(RefusedError, match=message.replace("(", r"\(")):
        config(tmp_path, **kwargs)


def test_batch_cluster_defaults_and_record(tmp_path):
    cfg = config(tmp_path, cluster="slurm", jobs=3, cores=4, walltime="1-02:00:00")
    assert cfg.job_resources() == {"jobs": 3, "cores": 4, "memory": "4GB", "walltime": "1-02:00:00", "queue": None,
                                   "account": None}  # fmt: skip
    assert cfg.resolved_max_in_flight() == 24  # 2 per worker thread over every job
    assert cfg.resolved_engine_threads() == 0  # the workers decide: the client cannot see their cores
    assert cfg.to_record()["cluster"] == "slurm"


# ---------------------------------------------------------------- dask-jobqueue job scripts

def _decode_inherited(script: str) -> dict:
    line = next(l for l in script.splitlines() if l.startswith(f"export {INHERIT_CONFIG_VARIABLE}="))
    return dask.config.deserialize(line.split("=", 1)[1])


def test_worker_config_reaches_batch_workers():
    inherited = _decode_inherited("\n".join(worker_config_prologue()))
    assert inherited["distributed"]["worker"]["profile"]["enabled"] is False
    assert inherited["distributed"]["nanny"]["pre-spawn-environ"]["MALLOC_TRIM_THRESHOLD_"] is None
    flat = {"distributed.worker.profile.enabled": False, "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    assert flat == WORKER_CONFIG  # one source: the local workers' settings are the batch workers' settings


@pytest.mark.parametrize("system, expected", [
    ("slurm", ["#SBATCH -p gpu", "#SBATCH -A astro", "#SBATCH --cpus-per-task=8", "#SBATCH -t 02:00:00",
               "#SBATCH --mem="]),
    ("pbs", ["#PBS -q gpu", "#PBS -A astro", "ncpus=8", "#PBS -l walltime=02:00:00"]),
])  # fmt: skip
def test_jobqueue_job_script(tmp_path, system, expected):
    cfg = config(tmp_path, cluster=system, jobs=2, cores=8, memory="16GB", walltime="02:00:00", queue="gpu",
                 account="astro", interface="lo")  # fmt: skip
    cluster = jobqueue_cluster(cfg)  # starts a scheduler only; nothing is submitted before scale()
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:"), cluster.scheduler_address  # interface lo
    finally:
        cluster.close()
    for piece in expected:
        assert piece in script, f"{piece!r} missing from\n{script}"
    assert "--nthreads 8" in script and "--interface lo" in script and sys.executable in script
    assert _decode_inherited(script)["distributed"]["worker"]["profile"]["enabled"] is False
    assert (tmp_path / "out.jobs").is_dir()  # the jobs' logs go beside the output, not into it


def test_cuda_cluster_refuses_clearly_without_dask_cuda(tmp_path, monkeypatch):
    from survey_infer.cluster import cuda_cluster

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # as if not installed
    with pytest.raises(RefusedError, match=r"--cluster cuda needs dask-cuda \(pip install 'survey-infer\[gpu\]'"):
        cuda_cluster(config(tmp_path, cluster="cuda"))


def test_cli_cluster_refusal_exit_status(small_store, tmp_path, capsys):
    code = main(["run", "mass_to_light", "--input", str(small_store), "--output", str(tmp_path / "o"), "--jobs", "2"])
    assert code == 2
    assert "--jobs: only for --cluster slurm or pbs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- survey-infer submit

def test_submit_dry_run_prints_one_job_running_the_whole_run(small_store, tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "mass_to_light", "--input", str(small_store), "--output", "out", "--bundle", str(tiny_bundle),
                 "--engine", "onnxruntime", "--cores", "8", "--memory", "16GB", "--walltime", "03:00:00", "--queue",
                 "short", "--account", "astro", "--gpus", "1", "--system", "slurm", "--setup", "module load cuda",
                 "--task-option", "x=1", "--overwrite", "--dry-run"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "has no option x" in captured.err  # refused on the login node, as the job would be
    code = main(["submit", "mass_to_light", "--input", str(small_store), "--output", "out", "--bundle", str(tiny_bundle),
                 "--engine", "torch", "--cores", "8", "--memory", "16GB", "--walltime", "03:00:00", "--queue",
                 "short", "--account", "astro", "--gpus", "1", "--system", "slurm", "--setup", "module load cuda",
                 "--rows-per-unit", "256", "--overwrite", "--dry-run"])  # fmt: skip
    script = capsys.readouterr().out
    assert code == 0
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ("--cpus-per-task=8", "--mem=15259M", "--time=03:00:00", "--partition=short", "--account=astro",
                      "--gres=gpu:1", "--nodes=1", f"--output=out.job-%j.log"):  # fmt: skip
        assert f"#SBATCH {directive}" in lines, directive
    assert "module load cuda" in lines and f"cd {tmp_path}" in lines
    command = lines[-1].split()
    assert command[:4] == ["exec", sys.executable, "-m", "survey_infer.cli"]
    run_argv = command[4:]
    assert run_argv[:6] == ["run", "mass_to_light", "--input", str(small_store), "--output", "out"]
    for flag in ("--cores", "--memory", "--walltime", "--queue", "--account", "--gpus", "--dry-run", "--cluster"):
        assert flag not in run_argv  # the job's resources, not the run's
    joined = " ".join(run_argv)
    assert "--engine torch" in joined and "--rows-per-unit 256" in joined and "--overwrite" in joined
    assert "--no-progress" in joined and f"--bundle {tiny_bundle}" in joined
    assert not (tmp_path / "out.job.sh").exists() and not (tmp_path / "out").exists()  # dry run: nothing written


def test_submit_pbs_script_and_refusals(small_store, tmp_path, capsys):
    from deploy.submit import batch_script

    text = batch_script("pbs", ["run", "mass_to_light", "--input", "a b.zarr", "--output", "o"], cores=4,
                        memory="8GB", walltime="00:30:00", queue="q", account="p1", gpus=2, job_name="si")  # fmt: skip
    assert "#PBS -l select=1:ncpus=4:mem=7630mb:ngpus=2" in text and "#PBS -q q" in text and "#PBS -A p1" in text
    assert "'a b.zarr'" in text  # quoted for the shell
    base = ["submit", "mass_to_light", "--input", str(small_store), "--output", str(tmp_path / "o"), "--dry-run"]
    assert main(base + ["--cluster", "slurm"]) == 2
    assert "--cluster local or cuda" in capsys.readouterr().err
    assert main(base + ["--jobs", "3"]) == 2
    assert "--jobs does not apply to submit" in capsys.readouterr().err


# ---------------------------------------------------------------- a real single-node SLURM

def _run_cli(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "survey_infer.cli", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def slurm_store(tmp_path_factory) -> Path:
    from training.mock import write_mock_cutouts

    return write_mock_cutouts(tmp_path_factory.mktemp("slurm_store") / "s.zarr", 200, size=69, seed=21,
                              rows_per_unit=64, rows_per_batch=32)  # fmt: skip


def test_run_on_single_node_slurm(single_node_slurm, slurm_store, tiny_bundle, tmp_path):  # noqa: F811
    """`survey-infer run --cluster slurm`: a dask-jobqueue worker in a SLURM job; every row once."""
    cluster = single_node_slurm
    out = tmp_path / "out"
    started = time.monotonic()
    done = _run_cli(["run", "mass_to_light", "--input", str(slurm_store), "--output", str(out), "--bundle",
                     str(tiny_bundle), "--engine", "torch", "--cluster", "slurm", "--jobs", "1", "--cores", "1",
                     "--memory", "1GB", "--walltime", "00:05:00", "--interface", "lo", "--worker-wait", "40",
                     "--no-progress", "--no-catalog"], cluster.env, tmp_path, RUN_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["config"]["cluster"] == "slurm"
    assert record["units"] == {"total": 4, "done": 4, "failed": 0, "skipped": 0, "ran": 4}
    assert record["host"] and record["engine"]["name"] == "torch"
    assert_exactly_once(out, 200)
    logs = list((tmp_path / "out.jobs").glob("*.err")) + list((tmp_path / "out.jobs").glob("*.out"))
    assert logs, "the SLURM job wrote no log beside the output"  # it really ran as a batch job
    assert time.monotonic() - started < 60


def test_submit_on_single_node_slurm(single_node_slurm, slurm_store, tiny_bundle, tmp_path):  # noqa: F811
    """`survey-infer submit`: sbatch runs one whole `survey-infer run` (own LocalCluster) as one job."""
    cluster = single_node_slurm
    done = _run_cli(["submit", "mass_to_light", "--input", str(slurm_store), "--output", "out", "--bundle",
                     str(tiny_bundle), "--engine", "torch", "--cores", "1", "--memory", "1GB", "--walltime",
                     "00:05:00", "--no-catalog"], cluster.env, tmp_path, 60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[-1]
    assert job_id.isdigit(), done.stdout
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if not cluster.run("squeue", "-h", "-j", job_id, timeout=10).stdout.strip():
            break
        time.sleep(1)
    else:
        cluster.run("scancel", job_id, timeout=10)
        pytest.fail(f"job {job_id} still in the queue after {RUN_TIMEOUT_S} s\n{cluster.logs()}")
    log = next(tmp_path.glob(f"out.job-{job_id}.log"), None)
    assert log is not None and (tmp_path / "out.job.sh").exists()
    record_path = tmp_path / "out" / "run.json"
    assert record_path.exists(), log.read_text()
    assert json.loads(record_path.read_text())["status"] == "complete", log.read_text()
    assert_exactly_once(tmp_path / "out", 200)


def test_jobs_that_never_start_are_refused_after_worker_wait(small_store, tiny_bundle, tmp_path, monkeypatch):
    """A batch system that accepts jobs but never runs them: refused (exit 2) after --worker-wait, not a hang."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": 'echo "Submitted batch job 4242"', "scancel": "exit 0", "squeue": "exit 0"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    tick = time.monotonic()
    done = _run_cli(["run", "mass_to_light", "--input", str(small_store), "--output", str(tmp_path / "out"), "--bundle",
                     str(tiny_bundle), "--cluster", "slurm", "--interface", "lo", "--worker-wait", "3",
                     "--no-progress"], env, tmp_path, 60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no Dask worker joined within --worker-wait 3 s: the slurm jobs are still queued" in done.stderr
    assert time.monotonic() - tick < 45
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cuda_cluster_shares_the_cores_over_the_gpus(tmp_path, monkeypatch):
    import types

    from survey_infer import cluster as cluster_module

    made = []
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kwargs: made.append(kwargs) or "cluster"
    utils = types.ModuleType("dask_cuda.utils")
    utils.get_n_gpus = lambda: 4
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", utils)
    monkeypatch.setattr(cluster_module, "available_cores", lambda: 16)
    assert cluster_module.cuda_cluster(config(tmp_path, cluster="cuda")) == "cluster"
    assert made[-1]["threads_per_worker"] == 4  # 16 cores over 4 GPU workers
    cluster_module.cuda_cluster(config(tmp_path, cluster="cuda", threads_per_worker=6))
    assert made[-1]["threads_per_worker"] == 6  # as asked
    fake.LocalCUDACluster = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("NVML Shared Library Not Found"))
    with pytest.raises(RefusedError, match="could not start a LocalCUDACluster: RuntimeError: NVML Shared Library"):
        cluster_module.cuda_cluster(config(tmp_path, cluster="cuda"))


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_submit_to_pbs_writes_the_script_and_prints_the_job_id(small_store, tiny_bundle, tmp_path, monkeypatch, capsys):
    env = _fake_bin(tmp_path, {"qsub": 'cp "$1" "$(dirname "$1")/submitted.sh"; echo 123.pbs-head'})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "mass_to_light", "--input", str(small_store), "--output", "out", "--bundle", str(tiny_bundle),
                 "--system", "pbs", "--cores", "4", "--walltime", "00:20:00"])  # fmt: skip
    assert code == 0 and "submitted pbs job 123.pbs-head" in capsys.readouterr().out
    script = (tmp_path / "out.job.sh").read_text()
    assert (tmp_path / "submitted.sh").read_text() == script  # qsub got the script that was written
    assert "#PBS -l select=1:ncpus=4:mem=3815mb" in script and "#PBS -o out.job.log" in script


def test_submit_refuses_when_the_batch_system_says_no(small_store, tiny_bundle, tmp_path, monkeypatch, capsys):
    env = _fake_bin(tmp_path, {"sbatch": 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1'})
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "mass_to_light", "--input", str(small_store), "--output", "out", "--bundle", str(tiny_bundle),
                 "--system", "slurm", "--queue", "nope"])  # fmt: skip
    assert code == 2
    assert "sbatch --parsable" in (err := capsys.readouterr().err) and "invalid partition specified: nope" in err
