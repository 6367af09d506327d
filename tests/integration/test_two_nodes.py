"""Training across nodes: `torchrun --nnodes=2` started twice, each "node" with its own copy of the project,
meeting through c10d rendezvous on 127.0.0.1 (gloo on CPU), gives the weights of one process with the same
global batch (the launcher docs/team.md gives for machines of a lab)."""

from __future__ import annotations

import json
import subprocess

import pytest

from components.io import load_safetensors
from tests.integration.conftest import copy_with_data, free_port
from tests.pipelines.conftest import BIN, micro_config, project_env

pytestmark = pytest.mark.integration


def torchrun_node(root, port: int, node_rank: int) -> subprocess.Popen:
    """One node's launcher: the same command on every node, only --node-rank differs."""
    cmd = [
        str(BIN / "torchrun"),
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=mimflow-two-nodes",
        f"--node-rank={node_rank}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "-m",
        "pipelines.pretrain_mae",
    ]
    return subprocess.Popen(
        cmd, cwd=root, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_nodes_match_one_process_with_the_same_global_batch(tmp_path, micro):
    batch = micro_config().pretrain_mae.batch_size
    per_rank = {"batch_size": batch // 2, "effective_batch": batch}  # 2 ranks x B/2 = the reference's B
    nodes = [copy_with_data(micro, tmp_path / f"node{i}", pretrain_mae=per_rank) for i in range(2)]
    port = free_port()
    procs = [torchrun_node(root, port, rank) for rank, root in enumerate(nodes)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}\n{out[-4000:]}"
    # global rank 0 writes the results; c10d rendezvous, not --node-rank, decides which node holds it
    written = [root for root in nodes if (root / "metrics" / "pretrain_mae.json").exists()]
    assert len(written) == 1, f"results on {len(written)} nodes"
    metrics = json.loads((written[0] / "metrics" / "pretrain_mae.json").read_text())
    reference = json.loads((micro / "metrics" / "pretrain_mae.json").read_text())
    assert metrics["effective_batch"] == reference["effective_batch"] == batch
    assert metrics["steps"] == reference["steps"]
    assert metrics["val_masked_loss"] == pytest.approx(reference["val_masked_loss"], abs=1e-4)
    ref = load_safetensors(micro / "models" / "pretrain_mae" / "encoder.safetensors")
    two = load_safetensors(written[0] / "models" / "pretrain_mae" / "encoder.safetensors")
    assert ref.keys() == two.keys()
    assert max(float((ref[k] - two[k]).abs().max()) for k in ref) < 1e-4
