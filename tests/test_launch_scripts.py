"""The launch scripts as a user meets them before owning a cluster or a TPU.

``--help``/``-h`` on every script; bad input as one error line and exit 2; ``--dry-run`` of
``tpu_vm.sh``, ``gpu_single_node.sh`` and ``slurm_multinode.sbatch`` prints every external command,
runs none (spies on PATH would notice), and each printed command is checked against the documented
flags of ``gcloud`` / ``srun`` / ``sbatch`` (written down below, with their reference pages) and, for
the environment each process gets, against the names ``opera_jax.distributed`` reads (imported, not
retyped). Where the real ``gcloud`` is installed it parses every printed command too, with no account
and no network, so that it stops right after parsing. And ``shellcheck`` passes on all of them.
(The SLURM script's job is also run for real on this machine: ``tests/test_launch.py``.)
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from opera_jax.data.beir import DATA_ENV
from opera_jax.distributed import (
    AUTO,
    COORDINATOR_ENV,
    DISTRIBUTED_ENV,
    LOCAL_DEVICE_IDS_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
COMMON = LAUNCH / "common.sh"  # sourced by the scripts that run in place, not run itself
SCRIPTS = sorted(p for p in LAUNCH.glob("*.sh") if p != COMMON) + sorted(LAUNCH.glob("*.sbatch"))
TPU_VM, GPU, SLURM = LAUNCH / "tpu_vm.sh", LAUNCH / "gpu_single_node.sh", LAUNCH / "slurm_multinode.sbatch"
TRAIN = ["opera-jax", "train", "configs/bge-large-dp.yaml", "--out", "/shared/runs/bge-dp"]

# ----------------------------------------------------------------------------- what the tools accept
# gcloud 528, `gcloud compute tpus tpu-vm COMMAND`: the SYNOPSIS of each reference page,
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/{describe,create,ssh,scp,delete}
# flag -> whether it takes a value.
GCLOUD_WIDE = {  # https://cloud.google.com/sdk/gcloud/reference (GCLOUD WIDE FLAGS)
    "--access-token-file": True,
    "--account": True,
    "--billing-project": True,
    "--configuration": True,
    "--flags-file": True,
    "--flatten": True,
    "--format": True,
    "--help": False,
    "--impersonate-service-account": True,
    "--log-http": False,
    "--project": True,
    "--quiet": False,
    "--trace-token": True,
    "--user-output-enabled": False,
    "--verbosity": True,
}
_SSH_COMMON = {
    "--dry-run": False,
    "--force-key-file-overwrite": False,
    "--internal-ip": False,
    "--plain": False,
    "--ssh-key-file": True,
    "--strict-host-key-checking": True,
    "--worker": True,
    "--zone": True,
    "--ssh-key-expiration": True,
    "--ssh-key-expire-after": True,
}
TPU_VM_COMMANDS = {  # command -> (flags, positionals: (at least, at most or None))
    "describe": ({"--zone": True}, (1, 1)),
    "create": (
        {
            "--zone": True,
            "--version": True,
            "--async": False,
            "--data-disk": True,
            "--description": True,
            "--internal-ips": False,
            "--labels": True,
            "--metadata": True,
            "--metadata-from-file": True,
            "--network": True,
            "--preemptible": False,
            "--queue-count": True,
            "--range": True,
            "--reserved": False,
            "--scopes": True,
            "--service-account": True,
            "--shielded-secure-boot": False,
            "--spot": False,
            "--subnetwork": True,
            "--tags": True,
            "--accelerator-type": True,
            "--topology": True,
            "--type": True,
        },
        (1, 1),
    ),
    "ssh": ({**_SSH_COMMON, "--ssh-flag": True, "--command": True, "--output-directory": True}, (1, 1)),
    "scp": ({**_SSH_COMMON, "--compress": False, "--recurse": False, "--scp-flag": True}, (2, None)),
    "delete": ({"--zone": True, "--async": False}, (1, 1)),
}
# https://slurm.schedmd.com/srun.html (OPTIONS): the ones a job of this kind may use, all --name=value.
SRUN_OPTIONS = {
    "--kill-on-bad-exit": {"0", "1"},
    "--nodes": None,
    "--ntasks": None,
    "--ntasks-per-node": None,
    "--gpus-per-node": None,
    "--gpus-per-task": None,
    "--cpus-per-task": None,
    "--export": None,
    "--label": None,
    "--unbuffered": None,
    "--mpi": None,
    "--cpu-bind": None,
    "--gpu-bind": None,
    "--wait": None,
    "--time": None,
    "--overlap": None,
    "--exclusive": None,
}
# https://slurm.schedmd.com/sbatch.html (OPTIONS), the ones an #SBATCH line here may set.
SBATCH_OPTIONS = {
    "--job-name",
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--cpus-per-task",
    "--time",
    "--output",
    "--error",
    "--partition",
    "--account",
    "--mem",
    "--exclusive",
    "--gres",
    "--constraint",
    "--qos",
}


def _gcloud(argv: list[str]) -> tuple[str, list[str], dict[str, str | None]]:
    """``gcloud compute tpus tpu-vm COMMAND ...`` -> (COMMAND, positionals, {flag: value}); an
    undocumented flag, a missing value or a wrong number of positionals fails the test."""
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
    command, rest = argv[4], argv[5:]
    own, (least, most) = TPU_VM_COMMANDS[command]
    known = {**own, **GCLOUD_WIDE}
    positionals, flags, i = [], {}, 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            assert name in known, f"gcloud compute tpus tpu-vm {command} has no flag {name}: {argv}"
            if known[name] and not eq:
                i += 1
                assert i < len(rest), f"{name} without a value: {argv}"
                value = rest[i]
            assert known[name] == bool(value), f"{name}: value {value!r}? {argv}"
            flags[name] = value or None
        else:
            positionals.append(word)
        i += 1
    assert least <= len(positionals) and (most is None or len(positionals) <= most), argv
    return command, positionals, flags


def _srun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``srun --opt=value ... COMMAND`` -> ({option: value}, COMMAND), each option documented."""
    assert argv[0] == "srun", argv
    options, i = {}, 1
    while argv[i].startswith("-"):
        name, _, value = argv[i].partition("=")
        assert name in SRUN_OPTIONS, f"srun option {name} is not on the list from srun.html"
        allowed = SRUN_OPTIONS[name]
        assert allowed is None or value in allowed, f"{argv[i]}: srun takes {name}={sorted(allowed)}"
        options[name] = value
        i += 1
    return options, argv[i:]


def _env(argv: list[str]) -> tuple[set[str], dict[str, str], list[str]]:
    """``env [-u NAME]... [NAME=VALUE]... COMMAND`` (GNU coreutils) -> (unset, set, COMMAND)."""
    assert argv[0] == "env", argv
    unset, assigned, i = set(), {}, 1
    while argv[i] == "-u":
        unset.add(argv[i + 1])
        i += 2
    while "=" in argv[i] and not argv[i].startswith("-"):
        name, _, value = argv[i].partition("=")
        assigned[name] = value
        i += 1
    return unset, assigned, argv[i:]


@pytest.fixture
def spies(tmp_path) -> dict:
    """An environment whose PATH starts with stand-ins for every command a launch script may run;
    each one, if called, leaves a file behind: a dry run must leave none."""
    bin_dir, called = tmp_path / "spies", tmp_path / "called"
    bin_dir.mkdir()
    called.mkdir()
    for name in (
        "gcloud",
        "git",
        "srun",
        "sbatch",
        "env",
        "python",
        "python3",
        "opera-jax",
        "mktemp",
        "mkdir",
        "rm",
        "nvidia-smi",
    ):
        (bin_dir / name).write_text(f'#!/bin/sh\ntouch "{called}/{name}"\nexit 97\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OPERA_", "XLA_", "NCCL_", "JAX_"))}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return {"env": env, "called": called}


def _dry_run(script: Path, args: list[str], spies: dict, **env) -> list[str]:
    """The dry run's output lines, after checking it ran nothing."""
    out = subprocess.run(
        ["bash", str(script), *args], env={**spies["env"], **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert sorted(p.name for p in spies["called"].iterdir()) == []  # nothing ran
    return out.stdout.splitlines()


def _commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if not line.startswith("#")]


# ----------------------------------------------------------------------------- --help, bad input


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_prints_usage_on_stdout_and_exits_0(script, flag, spies):
    out = subprocess.run(["bash", str(script), flag], env=spies["env"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.startswith("usage: ") and len(out.stdout.splitlines()) > 3
    assert sorted(p.name for p in spies["called"].iterdir()) == []


@pytest.mark.parametrize("args", [["--bogus", "--", "x"], ["-Z", "--", "x"], []], ids=["long", "short", "none"])
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "quickstart.sh"], ids=lambda p: p.name)
def test_bad_input_is_one_error_line_and_exit_2(script, args, spies):
    out = subprocess.run(["bash", str(script), *args], env=spies["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f"{script.name}: "), out.stderr


def test_slurm_script_refuses_to_run_outside_a_job(spies):
    out = subprocess.run(
        ["bash", str(SLURM), "configs/quickstart.yaml"], env=spies["env"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr and len(out.stderr.splitlines()) == 1
    assert sorted(p.name for p in spies["called"].iterdir()) == []


# ----------------------------------------------------------------------------- tpu_vm.sh


def test_tpu_vm_dry_run_of_a_v5litepod_16(spies):
    lines = _dry_run(
        TPU_VM,
        [
            "--dry-run",
            "-n",
            "opera",
            "-z",
            "us-west4-a",
            "-t",
            "v5litepod-16",
            "--",
            "opera-jax",
            "train",
            "configs/qwen3-0.6b-dp.yaml",
            "--out",
            "gs://BUCKET/qwen3-dp",
        ],
        spies,
    )
    cmds = _commands(lines)
    gcloud = [_gcloud(c) for c in cmds if c[0] == "gcloud"]
    assert [g[0] for g in gcloud] == ["describe", "create", "scp", "ssh", "scp", "ssh", "delete"]
    for command, positionals, flags in gcloud:  # the VM: the positional, or scp's one remote side
        assert (
            positionals == ["opera"] if command != "scp" else sum(p.startswith("opera:") for p in positionals) == 1
        ) and flags["--zone"] == "us-west4-a"
    assert "--project" not in str(gcloud)  # gcloud's configured project
    _, _, create = gcloud[1]
    assert (create["--accelerator-type"], create["--version"]) == ("v5litepod-16", "v2-alpha-tpuv5-lite")
    for _command, _positionals, flags in gcloud[2:6]:  # everything between create and delete: on every worker
        assert flags["--worker"] == "all"
    tarball = next(c for c in cmds if c[0] == "git")
    assert tarball[:5] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz"] and tarball[-1] == "HEAD"
    assert gcloud[2][1] == [tarball[6], "opera:~/opera-jax.tar.gz"]  # the archive goes to the workers
    assert 'pip install -q -e "$HOME/opera-jax[tpu]"' in gcloud[3][2]["--command"]
    assert gcloud[4][1] == ["../shared/data", "opera:~/opera-data"] and "--recurse" in gcloud[4][2]
    *setup, run = gcloud[5][2]["--command"].split(" && ")
    assert setup == ["cd ~/opera-jax", ". .venv/bin/activate"]
    unset, assigned, command = _env(shlex.split(run))
    assert assigned == {DATA_ENV: "$HOME/opera-data", DISTRIBUTED_ENV: AUTO}  # JAX reads the TPU metadata
    assert command == ["opera-jax", "train", "configs/qwen3-0.6b-dp.yaml", "--out", "gs://BUCKET/qwen3-dp"]
    assert gcloud[6][2] == {"--zone": "us-west4-a", "--quiet": None}
    assert lines[lines.index(shlex.join(cmds[-1])) - 1].startswith("# at exit")  # the delete runs on failure too


def test_tpu_vm_dry_run_of_an_existing_vm_data_on_gcs_outputs_copied_back(spies):
    lines = _dry_run(
        TPU_VM,
        [
            "--dry-run",
            "-n",
            "opera",
            "-z",
            "us-central2-b",
            "-p",
            "my-project",
            "-k",
            "-s",
            "-d",
            "gs://bucket/data",
            "-o",
            "runs/back",
            "--",
            "opera-jax",
            "train",
            "c.yaml",
            "--out",
            "runs/x y",
        ],
        spies,
    )
    gcloud = [_gcloud(c) for c in _commands(lines) if c[0] == "gcloud"]
    assert [g[0] for g in gcloud] == ["describe", "create", "ssh", "ssh", "scp"]  # -s: no install; -k: no delete
    assert all(g[2]["--project"] == "my-project" for g in gcloud)
    assert (
        gcloud[2][2]["--command"] == "mkdir -p ~/opera-data && gcloud storage cp -r 'gs://bucket/data/*' ~/opera-data/"
    )
    assert shlex.split(gcloud[3][2]["--command"].split(" && ")[-1])[-2:] == ["--out", "runs/x y"]
    assert ["mkdir", "-p", "runs/back"] in _commands(lines)
    _, positionals, flags = gcloud[4]
    assert positionals == ["opera:~/opera-jax/runs/x y", "runs/back"] and flags["--worker"] == "0"


@pytest.mark.skipif(
    shutil.which("gcloud") is None,
    reason="gcloud is not installed: the documented flags above are checked, not gcloud's own parser",
)
def test_gcloud_itself_parses_every_dry_run_command(spies, tmp_path):
    lines = _dry_run(
        TPU_VM,
        [
            "--dry-run",
            "-n",
            "opera",
            "-z",
            "us-west4-a",
            "-t",
            "v5litepod-16",
            "-p",
            "proj",
            "--",
            "opera-jax",
            "train",
            "c.yaml",
            "--out",
            "runs/x",
        ],
        spies,
    )
    # No account, no credentials from the environment or a metadata server, the TPU API on a closed
    # port: gcloud parses the command line, then stops at "no active account" before any request.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDSDK_", "GOOGLE_"))}
    env.update(
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
        CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU="http://127.0.0.1:9/",
    )
    commands = [c for c in _commands(lines) if c[0] == "gcloud"]
    assert len(commands) == 8
    for argv in commands:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode != 2 and "do not currently have an active account" in out.stderr, (argv, out.stderr)


# ----------------------------------------------------------------------------- gpu_single_node.sh


def test_gpu_single_node_dry_run(spies):
    check, job = _commands(_dry_run(GPU, ["--dry-run", "-g", "8", "--", *TRAIN], spies))
    for argv in (check, job):
        unset, assigned, _ = _env(argv)
        assert unset == {COORDINATOR_ENV, DISTRIBUTED_ENV}  # one process, whatever the shell exported
        assert assigned == {
            "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
            "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
            "NCCL_DEBUG": "WARN",
        }
    assert _env(check)[2][:2] == ["python", "-c"] and _env(job)[2] == TRAIN
    # without -g every GPU stays visible; the user's exports win or are kept
    check, job = _commands(
        _dry_run(
            GPU, ["--dry-run", "-m", "0.8", "--", *TRAIN], spies, XLA_FLAGS="--xla_dump_to=/tmp/d", NCCL_DEBUG="INFO"
        )
    )
    assert _env(job)[1] == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.8",
        "NCCL_DEBUG": "INFO",
        "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true",
    }


# ----------------------------------------------------------------------------- slurm_multinode.sbatch


def _slurm_dry_run(spies, **env) -> tuple[dict, set, dict, list, list[str]]:
    lines = _dry_run(SLURM, ["--dry-run", *TRAIN[2:]], spies, **env)
    (job,) = _commands(lines)
    options, command = _srun(job)
    unset, assigned, command = _env(command)
    return options, unset, assigned, command, [x for x in lines if x.startswith("# task ")]


def test_slurm_dry_run_of_2_nodes_of_8_gpus(spies):
    options, unset, assigned, command, tasks = _slurm_dry_run(spies)
    assert options == {"--kill-on-bad-exit": "1"}  # one failed task ends the job, nobody waits in a collective
    assert unset == {COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV}  # they would override auto
    assert assigned == {
        DISTRIBUTED_ENV: AUTO,
        LOCAL_DEVICE_IDS_ENV: "0,1,2,3,4,5,6,7",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
        "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
        "NCCL_DEBUG": "WARN",
    }
    assert command == TRAIN
    assert tasks == [f"# task {i}: SLURM_PROCID={i} SLURM_LOCALID=0 SLURM_NODEID={i} SLURM_NTASKS=2" for i in (0, 1)]


def test_slurm_dry_run_takes_the_job_shape_from_slurm(spies):
    _, _, assigned, _, tasks = _slurm_dry_run(spies, SLURM_JOB_NUM_NODES="4", SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="2")
    assert (
        assigned[LOCAL_DEVICE_IDS_ENV] == "0,1" and len(tasks) == 4 and tasks[3].startswith("# task 3: SLURM_PROCID=3")
    )
    out = subprocess.run(
        ["bash", str(SLURM), "--dry-run", "c.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**spies["env"], "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16"},
    )
    assert out.returncode == 2 and "one task per node" in out.stderr and len(out.stderr.splitlines()) == 1


def test_sbatch_header_sets_documented_options_one_task_per_node():
    header = dict(
        line.removeprefix("#SBATCH ").partition("=")[::2]
        for line in SLURM.read_text().splitlines()
        if line.startswith("#SBATCH ")
    )
    assert set(header) <= SBATCH_OPTIONS and all(header.values())
    assert header["--ntasks-per-node"] == "1" and int(header["--gpus-per-node"]) >= 1


# ----------------------------------------------------------------------------- local_multiprocess.sh


def test_local_multiprocess_gives_each_process_what_distributed_reads():
    out = subprocess.run(
        ["bash", str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "-d", "3", "--", "env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for i in (0, 1):
        env = dict(line[4:].partition("=")[::2] for line in out.stdout.splitlines() if line.startswith(f"[{i}] "))
        assert env[COORDINATOR_ENV].startswith("127.0.0.1:") and env[NUM_PROCESSES_ENV] == "2"
        assert env[PROCESS_ID_ENV] == str(i) and env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=3")


# ----------------------------------------------------------------------------- shellcheck


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)",
)
def test_shellcheck_is_clean():
    out = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS + [COMMON])], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout
