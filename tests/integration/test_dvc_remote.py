"""A shared DVC remote (docs/team.md; default off in .dvc/config): clone A trains and `dvc push`es, a fresh
clone B `dvc pull`s A's data and encoder instead of retraining them, and a param changed in B makes only the
stages that read it stale."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from components.io import load_safetensors
from tests.pipelines.conftest import BIN, project_env

pytestmark = pytest.mark.integration


def sh(root, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=root, env=project_env(root), capture_output=True, text=True, timeout=300)
    out = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out}"
    return proc.stdout


def dvc_status(root) -> dict:
    """`dvc status` of what A ran: pretrain_mae and the stages it depends on."""
    return json.loads(sh(root, str(BIN / "dvc"), "status", "--json", "--with-deps", "pretrain_mae"))


def test_a_fresh_clone_pulls_what_another_trained(tmp_path, micro):
    a, remote, b = micro, tmp_path / "remote", tmp_path / "b"
    dvc = str(BIN / "dvc")
    sh(a, dvc, "remote", "add", "--default", "team", str(remote))
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "pretrain_mae on the micro params; the team remote")
    sh(a, dvc, "push")
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    sh(b, dvc, "pull", "--with-deps", "pretrain_mae")
    # B has A's data and encoder, bit for bit, without running a stage
    for path in ("models/pretrain_mae/encoder.safetensors", "models/pretrain_mae/mae.safetensors"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert load_safetensors(b / "models/pretrain_mae/encoder.safetensors").keys()
    assert not (b / "checkpoints").exists()
    # Everything pulled is up to date; what dvc status still reports is pretrain_mae's checkpoints, a
    # `persist: true, cache: false` out that no remote holds (issue 30), so `dvc repro` in B would retrain.
    assert dvc_status(b) == {"pretrain_mae": [{"changed outs": {"checkpoints/pretrain_mae": "deleted"}}]}

    # one param changed in B: only the stage that reads it is stale, prepare stays up to date
    params = yaml.safe_load((b / "params.yaml").read_text())
    params["pretrain_mae"]["mask_ratio"] = 0.5 if params["pretrain_mae"]["mask_ratio"] != 0.5 else 0.6
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc_status(b)
    assert set(status) == {"pretrain_mae"}
    assert {"changed deps": {"params.yaml": {"pretrain_mae": "modified"}}} in status["pretrain_mae"]
