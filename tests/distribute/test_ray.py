"""Ray scale-out on a real local cluster (head and workers as separate processes), with workers and drivers killed.

The reference for every run is a single-process run with the same seed and thread count: the checkpoints must be
equal bit for bit, whatever was killed on the way.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from mobe import MobeConfig, compress
from mobe.cli.main import main
from mobe.fixtures import build_tiny_moe

ray = pytest.importorskip("ray", reason="Ray is the optional extra mobe[ray]")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 2500  # about a second per job on one thread (never stopped early): long enough to be killed in the middle
CONFIG = MobeConfig(
    num_bases=2, rank=16, steps=STEPS, eval_every=100, stop_tol=0.0, threads=1, device="cpu", matrices=("gate", "up")
)  # 4 layers x gate, up: 8 jobs
CLI_ARGS = [
    *("--bases", "2", "--rank", "16", "--steps", str(STEPS), "--eval-every", "100", "--stop-tol", "0"),
    *("--threads", "1", "--matrices", "gate,up"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray")
    return build_tiny_moe(root / "src", "qwen3_moe", num_layers=4, hidden_size=64, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    compress(model, out, CONFIG, progress=False)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no jobs and two one-CPU worker nodes, each its own raylet and worker processes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _running_job_pids() -> list[int]:
    """Processes whose title says they are running a mobe job (Ray names a busy worker `ray::<task name>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::mobe-job"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _node_of(cluster: Cluster, pid: int):
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = _parent(pid)
    raise AssertionError("job process belongs to no worker node")


def test_worker_node_killed_mid_job_is_retried_elsewhere(model, reference, cluster, tmp_path, checkpoint_contents):
    out, work = tmp_path / "out", tmp_path / "out.mobe-work"
    ray.init(address=cluster.address)
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["report"] = compress(model, out, CONFIG, ray=True, progress=False)
        except BaseException as err:  # surfaced by the main thread
            outcome["error"] = err

    driver = threading.Thread(target=drive)
    driver.start()
    # With every node on one machine, the driver attaches to whichever raylet Ray picks, possibly a worker's; that
    # node cannot be removed under a connected driver, so the victim is a node running a job and not the driver's.
    driver_socket = ray._private.worker.global_worker.node._raylet_socket_name
    try:
        deadline = time.time() + 120
        victims: list = []
        while not victims and time.time() < deadline and driver.is_alive():
            nodes = []
            for pid in _running_job_pids():
                try:
                    nodes.append(_node_of(cluster, pid))
                except (OSError, AssertionError):  # the process ended while we looked
                    continue
            victims = [n for n in nodes if n._raylet_socket_name != driver_socket]
            time.sleep(0.05)
        assert victims, f"no job started on a removable node: {outcome.get('error')!r}"
        victim = victims[0]
        finished_before = len(list(work.glob("layer*.safetensors")))
        cluster.remove_node(victim, allow_graceful=False)  # raylet and its workers die, job and all
        driver.join(timeout=300)
    finally:
        ray.shutdown()
    assert "error" not in outcome, outcome.get("error")
    assert finished_before < 8
    assert len(outcome["report"].results) == 8
    assert checkpoint_contents(out) == checkpoint_contents(reference)
    cluster.add_node(num_cpus=1)  # back to two workers for the next test
    cluster.wait_for_nodes()


def test_killed_driver_resumes_from_finished_jobs(
    model, reference, cluster, tmp_path, checkpoint_contents, kill_after_first_job
):
    out, work = tmp_path / "out", tmp_path / "out.mobe-work"
    cmd = [sys.executable, "-m", "mobe", "compress", str(model), "-o", str(out), "--ray", cluster.address, "-q"]
    finished = kill_after_first_job([*cmd, *CLI_ARGS], work)
    assert 1 <= len(finished) < 8, finished
    assert not out.exists()

    assert main(["compress", str(model), "-o", str(out), "--ray", cluster.address, "-q", *CLI_ARGS]) == 0
    report = json.loads((out / "mobe_report.json").read_text())
    resumed = {f"layer{r['layer']:05d}.{r['matrix']}.safetensors" for r in report["results"] if r["resumed"]}
    assert set(finished) <= resumed  # jobs the dead driver's tasks finished after it died count as well
    assert not work.exists()
    assert checkpoint_contents(out) == checkpoint_contents(reference)
