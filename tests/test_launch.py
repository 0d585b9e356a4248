"""The multi-host path on one machine: ``launch/local_multiprocess.sh`` runs a real DP training on
2 processes x 2 CPU devices; a process killed mid-run brings the job down instead of hanging;
resuming on 2 processes continues exactly; and the whole 2-process run (the steps before the kill
and those after the resume) equals 1 process x 4 devices running the same 12 steps uninterrupted:
losses, evaluations, DP's plans and the exported parameters.

``launch/slurm_multinode.sbatch`` runs for real too, under bash with the variables SLURM gives the
batch shell of a 2-node job on 127.0.0.1 and a stand-in ``srun`` (``tests/fakes/srun``) that starts
its 2 tasks here: the start-up path of a SLURM job (``OPERA_DISTRIBUTED=auto``, JAX's own SLURM
detection) trains like 1 process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run
from safetensors.numpy import load_file

from opera_jax.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
TINY = ROOT / "tests" / "golden" / "tiny_bert"


def _args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "opera_jax.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        *tiny_run(
            TINY,
            "train.log_every=1",
            # DP, refreshed every 2 steps: the plan changes during the run, from device state
            "method.name=dp",
            "method.dp.refresh_every=2",
            *extra,
        ),
        "--out",
        str(out),
    ]


def _env(tmp_path: Path, devices: int | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPERA_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for k in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        env.pop(k, None)
    if devices is not None:  # the session's flags (conftest.py), with this device count last (the one XLA keeps)
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


STEPS = ["optim.max_steps=12", "train.eval_every=6", "train.checkpoint_every=2"]


def _two_processes(tmp_path, out, *extra):
    return subprocess.run(
        ["bash", str(LAUNCHER), "-n", "2", "-d", "2", "--", *_args(out, *extra)],
        env=_env(tmp_path),
        timeout=900,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _plans(run: Path) -> dict[int, np.ndarray]:
    import orbax.checkpoint as ocp

    from opera_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints")
    out = {
        s: np.asarray(ckpt.manager.restore(s, args=ocp.args.Composite(plan=ocp.args.StandardRestore()))["plan"]["pair"])
        for s in ckpt.manager.all_steps()
    }
    ckpt.close()
    return out


def _max_param_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert x.keys() == y.keys()
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


@pytest.mark.slow
def test_killed_process_fails_the_job_and_two_processes_resumed_train_like_one(tmp_path):
    base = tmp_path
    one = base / "one"  # the reference: 1 process x 4 devices, uninterrupted
    subprocess.run(_args(one, *STEPS), env=_env(base, 4), check=True, timeout=900, cwd=ROOT)
    run = base / "killed"
    job = subprocess.Popen(
        ["bash", str(LAUNCHER), "-n", "2", "-d", "2", "--", *_args(run, *STEPS)],
        env=_env(base),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    pattern = f"^{sys.executable} -m opera_jax.cli train .*--out {run}$"
    workers = []
    while len(workers) < 2:
        workers = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
        time.sleep(0.05)  # not a busy loop: the workers it waits for need the CPU to start
    while not (run / "checkpoints" / "2").exists():  # the first checkpoint is complete (Orbax renames on commit)
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.05)
    victim = int(workers[-1])
    os.kill(victim, signal.SIGSTOP)  # frozen: the other process cannot get past the next collective ...
    os.kill(victim, signal.SIGKILL)  # ... and then it dies without a word
    killed = time.time()
    _, err = job.communicate(timeout=300)  # the job ends: nothing hangs
    assert job.returncode != 0
    assert "stopping the others" in err
    # the survivor (deaf to SIGTERM under jax.distributed) is killed after the launcher's 5 s grace,
    # not left to wait out JAX's 100 s heartbeat timeout
    assert time.time() - killed < 60
    assert not (run / "model").exists()
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    before = _rows(run / "train_log.jsonl")[:saved]
    resumed = _two_processes(base, run, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _rows(one / "train_log.jsonl"), _rows(run / "train_log.jsonl")
    assert b[:saved] == before  # kept from the first attempt (timings included): it resumed, not restarted
    assert [r["step"] for r in a] == list(range(1, 13)) == [r["step"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5)
    ma, mb = _rows(one / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["step"] for r in ma] == [0, 6, 12] == [r["step"] for r in mb]
    np.testing.assert_allclose([r["ndcg@10"] for r in mb], [r["ndcg@10"] for r in ma], atol=1e-4)
    pa, pb = _plans(one), _plans(run)
    assert pa.keys() == pb.keys() and len(pa) >= 2
    for s in pa:  # DP's plans, drawn on device from the trained scores: identical
        np.testing.assert_array_equal(pa[s], pb[s])
    assert _max_param_diff(one, run) <= 1e-5
    assert resumed.stdout.count("final: ndcg@10") == 1  # process 0 reports, not every process


def test_launcher_help_and_usage_errors():
    ok = subprocess.run(["bash", str(LAUNCHER), "-h"], capture_output=True, text=True)
    assert ok.returncode == 0 and COORDINATOR_ENV in ok.stdout
    bad = subprocess.run(["bash", str(LAUNCHER)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "usage" in bad.stderr


SBATCH = ROOT / "launch" / "slurm_multinode.sbatch"
FAKES = ROOT / "tests" / "fakes"  # srun


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX's SLURM rule: 61440 + id % 4096) is free here."""
    import socket

    start = int(time.time())
    for offset in range(4096):
        port = 61440 + (start + offset) % 4096
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 100 + port - 61440  # job id % 4096 == port - 61440
    raise RuntimeError("no free port in 61440-65535")


def _batch_env(tmp_path: Path, nodes: int, devices: int) -> dict:
    """What sbatch gives the batch shell of a job of ``nodes`` nodes x 1 task (on 127.0.0.1, each
    node with ``devices`` simulated CPU devices standing in for its GPUs), plus the stand-in srun."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():  # not in a venv: an activate that finds this Python
        venv = tmp_path / "venv"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    job = _slurm_job_id()
    return {
        **_env(tmp_path, devices),
        "PATH": f"{FAKES}:{os.environ['PATH']}",
        "OPERA_VENV": str(venv),
        "SLURM_JOB_ID": str(job),
        "SLURM_JOBID": str(job),
        "SLURM_JOB_NAME": "opera-jax",
        "SLURM_JOB_NODELIST": ",".join(["127.0.0.1"] * nodes),
        "SLURM_NODELIST": ",".join(["127.0.0.1"] * nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes),
        "SLURM_NPROCS": str(nodes),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_GPUS_ON_NODE": str(devices),
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }


@pytest.mark.slow
def test_slurm_job_of_two_nodes_trains_like_one_process(tmp_path):
    steps = ["optim.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"]
    one = tmp_path / "one"
    subprocess.run(_args(one, *steps), env=_env(tmp_path, 4), check=True, timeout=900, cwd=ROOT)
    two = tmp_path / "slurm"
    train_args = _args(two, *steps)[4:]  # what follows `opera-jax train`
    job = subprocess.run(
        ["bash", str(SBATCH), *train_args],
        env=_batch_env(tmp_path, 2, 2),
        cwd=tmp_path,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    a, b = _rows(one / "train_log.jsonl"), _rows(two / "train_log.jsonl")
    assert [r["step"] for r in a] == [1, 2] == [r["step"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5)
    assert _max_param_diff(one, two) <= 1e-5
    # one job, not two lone processes (each its own process 0, and as exact with 2 devices as with 4):
    assert job.stdout.count("final: ndcg@10") == 1  # only process 0 of the 2 reports
