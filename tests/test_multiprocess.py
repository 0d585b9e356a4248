"""Two processes on 127.0.0.1 (jax.distributed) train exactly like one process with as many devices."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

WORKER = Path(__file__).resolve().parent / "workers" / "train_steps.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = tmp_path / "one.json"
    subprocess.run([sys.executable, str(WORKER), str(one), "4"], check=True, timeout=600)
    two = tmp_path / "two.json"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(two), "2", coordinator, "2", str(i)]) for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["devices"], a["processes"], b["devices"], b["processes"]) == (4, 1, 4, 2)
    assert len(a["losses"]) >= 3
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    assert b["checksum"] == pytest.approx(a["checksum"], rel=1e-6)
