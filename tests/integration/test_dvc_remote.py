"""A shared DVC remote (docs/team.md; default off in .dvc/config): clone A trains and `dvc push`es, a fresh
clone B `dvc pull`s A's data and models and is up to date, `dvc repro` training nothing (resumable checkpoints
are no DVC out, issue 30), and
`dvc exp run -S pretrain_mae.<key>=...` re-runs pretrain_mae only and leaves stale only what depends on it. What a
run leaves for git is what the README says to commit (issue 28): dvc.lock (staged by core.autostage), metrics/,
runs/, plots/ (and params.yaml after -S), never a .gitignore, data, models or checkpoints."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from components.io import load_safetensors
from tests.pipelines.conftest import BIN, project_env

pytestmark = pytest.mark.integration

COMMITTED = re.compile(r"^(dvc\.lock|params\.yaml|(metrics|runs|plots)/.+)$")  # what a run leaves for git


def sh(root, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=root, env=project_env(root), capture_output=True, text=True, timeout=900)
    out = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out}"
    return proc.stdout + proc.stderr


def dvc_status(root, target: str) -> dict:
    """`dvc status` of ``target`` and the stages it depends on."""
    proc = subprocess.run(
        [str(BIN / "dvc"), "status", "--json", "--with-deps", target],
        cwd=root,
        env=project_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def git_changes(root) -> dict[str, str]:
    """`git status --porcelain`, file by file: path -> its two-letter state."""
    lines = sh(root, "git", "status", "--porcelain", "--untracked-files=all").splitlines()
    return {line[3:]: line[:2] for line in lines if line.strip()}


@pytest.mark.timeout(900)  # the micro fixture's training and the experiment's, on a loaded 2-core machine
def test_a_fresh_clone_pulls_what_another_trained(tmp_path, micro):
    a, remote, b = micro, tmp_path / "remote", tmp_path / "b"
    dvc = str(BIN / "dvc")
    ran = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    target = "finetune@mae-0" if "finetune@mae-0" in ran else "pretrain_mae"  # finetune only with the team server

    # what A's run left for git: its results, dvc.lock staged, nothing DVC caches, no .gitignore, no checkpoint
    changes = git_changes(a)
    assert changes.pop("dvc.lock") == "A ", "core.autostage stages dvc.lock"
    assert changes and all(COMMITTED.match(p) for p in changes), sorted(changes)
    assert "metrics/pretrain_mae.json" in changes and "runs/pretrain_mae.json" in changes
    assert (a / "checkpoints" / "pretrain_mae" / "last.pt").is_file()  # kept, ignored by git and DVC

    sh(a, dvc, "remote", "add", "--default", "team", str(remote))
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "pretrain_mae on the micro params; the team remote")
    sh(a, dvc, "push")
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    sh(b, dvc, "pull", "--with-deps", target)
    # B has A's data and encoder, bit for bit, without running a stage, and DVC says all is up to date
    for path in ("models/pretrain_mae/encoder.safetensors", "models/pretrain_mae/mae.safetensors"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert load_safetensors(b / "models/pretrain_mae/encoder.safetensors").keys()
    assert not (b / "checkpoints").exists()
    assert dvc_status(b, target) == {}
    out = sh(b, dvc, "repro", target)  # and dvc repro trains nothing
    assert "Running stage" not in out and "didn't change" in out, out[-3000:]
    assert git_changes(b) == {}

    # an experiment on one pretrain_mae param re-runs pretrain_mae only (not prepare), and of what depends on
    # it, finetune@mae-0 is the one stage stale after it: not pretrain_ibot, which it also reads
    mask = yaml.safe_load((b / "params.yaml").read_text())["pretrain_mae"]["mask_ratio"]
    started = time.perf_counter()
    out = sh(b, dvc, "exp", "run", "-S", f"pretrain_mae.mask_ratio={0.5 if mask != 0.5 else 0.6}", "pretrain_mae")
    print(f"dvc exp run pretrain_mae: {time.perf_counter() - started:.0f} s")
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"pretrain_mae"}, out[-3000:]
    assert "Stage 'prepare' didn't change" in out, out[-3000:]
    assert dvc_status(b, "pretrain_mae") == {}
    if target != "pretrain_mae":
        stale = dvc_status(b, target)
        assert set(stale) == {target}, stale
        assert {"changed deps": {"models/pretrain_mae": "modified"}} in stale[target], stale
    changes = git_changes(b)
    assert {"params.yaml", "dvc.lock", "metrics/pretrain_mae.json"} <= set(changes), sorted(changes)
    assert all(COMMITTED.match(p) for p in changes), sorted(changes)
