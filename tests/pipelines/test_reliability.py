"""Reliability under bad input, an unreachable tracking server, concurrent runs and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from components.io import torch_load
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, dvc_repro, make_project, project_env, run


def test_unreachable_tracking_server_fails_fast_before_any_work(tmp_path):
    root = make_project(tmp_path / "p")
    env = {**project_env(root), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "pipelines.prepare"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "http://127.0.0.1:9" in last and "unreachable" in last, last
    assert time.perf_counter() - start < 60
    assert not (root / "data").exists()


def test_a_bad_params_value_anywhere_stops_the_dag_at_its_first_stage(tmp_path):
    root = make_project(tmp_path / "p")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["cka"] = {**params.get("cka", {}), "no_such_knob": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(root, str(BIN / "dvc"), "repro", check=False)
    assert proc.returncode != 0
    assert "cka.no_such_knob: unknown key" in proc.stderr
    assert not (root / "data").exists() and not (root / "models").exists()


def test_a_second_dvc_repro_in_the_same_workspace_is_refused(tmp_path):
    root = make_project(tmp_path / "p")
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "prepare"],
        cwd=root,
        env=project_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not (root / ".dvc" / "tmp" / "rwlock").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        second = run(root, str(BIN / "dvc"), "repro", "prepare", check=False)
        assert second.returncode != 0
        assert "busy" in second.stderr or "lock" in second.stderr, second.stderr
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert read_results(root / "metrics" / "prepare.json")["classification"]["train"] > 0


def _long_mae(root) -> int:
    """Make pretrain_mae long enough to be killed mid-run; returns its total optimizer steps."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain_mae"].update(epochs=16, ckpt_every=8, log_every=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, "git", "commit", "-qam", "long mae")
    return 16 * (96 // params["pretrain_mae"]["batch_size"])


def test_kill_9_mid_training_then_dvc_repro_resumes_to_the_same_result(tmp_path):
    straight = make_project(tmp_path / "straight")
    total = _long_mae(straight)
    dvc_repro(straight, "pretrain_mae")

    killed = make_project(tmp_path / "killed")
    _long_mae(killed)
    dvc_repro(killed, "prepare")
    ckpt = killed / "checkpoints" / "pretrain_mae" / "last.pt"
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "pretrain_mae"],
        cwd=killed,
        env=project_env(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the training process with it
    proc.wait()
    step = torch_load(ckpt)["step"]
    assert 0 < step < total, f"killed at step {step} of {total}"
    assert not (killed / "metrics" / "pretrain_mae.json").exists()

    resumed = dvc_repro(killed, "pretrain_mae").stderr  # checkpoints/ is no DVC out: DVC leaves it in place
    assert "resumed pretrain_mae from " in resumed and f"last.pt at step {step}" in resumed, resumed[-2000:]
    a = read_results(straight / "metrics" / "pretrain_mae.json")
    b = read_results(killed / "metrics" / "pretrain_mae.json")
    for key in ("train_loss", "val_masked_loss"):
        assert a[key] == b[key], key
    weights = "models/pretrain_mae/encoder.safetensors"
    assert (straight / weights).read_bytes() == (killed / weights).read_bytes()
    # the killed run's MLflow run, left RUNNING by kill -9, was set KILLED when the stage started again
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mimflow").experiment_id
    runs = client.search_runs([experiment], "tags.stage = 'pretrain_mae'", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]


def test_a_checkpoint_is_resumed_only_under_the_same_data_and_process_count(tmp_path):
    """The checkpoint fingerprint hashes the stage's data by content: a dataset rebuilt with other
    pixels under the same file names (a changed rotation range, say) must not resume a finished run."""
    import torch

    from components.training.distributed import DistInfo
    from pipelines.common import StageContext
    from pipelines.config import validate_params
    from tests.pipelines.conftest import micro_params

    params = validate_params(micro_params())
    data = tmp_path / "data" / "classification"
    (data / "images").mkdir(parents=True)
    (data / "index.json").write_text('{"train": [["images/a.png", 0]]}')
    (data / "images" / "a.png").write_bytes(b"pixels")

    def fingerprint(world_size: int = 1) -> str:
        ctx = StageContext(
            "pretrain_mae", params, torch.device("cpu"), "fp32", DistInfo(0, world_size, 0), tracker=None, root=tmp_path
        )
        return ctx.fingerprint(data)

    first = fingerprint()
    assert fingerprint() == first
    assert fingerprint(world_size=2) != first
    (data / "images" / "a.png").write_bytes(b"other pixels")
    assert fingerprint() != first
    second = fingerprint()
    (data / "images" / "a.png").rename(data / "images" / "b.png")
    assert fingerprint() != second


def test_a_crash_ends_the_mlflow_run_as_failed_and_keeps_the_traceback(tmp_path):
    """An unexpected exception (a bug, not bad input) keeps its traceback and a non-zero exit, and the
    stage's MLflow run ends FAILED (MLflow's exit hook would otherwise close it as FINISHED)."""
    import mlflow

    root = make_project(tmp_path / "crash")
    (root / "crash.py").write_text(
        "import sys\nfrom pathlib import Path\nfrom pipelines.common import main\n\n"
        "def body(ctx):\n    raise RuntimeError('boom')\n\n"
        "sys.exit(main('prepare', body, Path('params.yaml')))\n"
    )
    proc = run(root, str(BIN / "python"), "crash.py", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mimflow"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize("alias", ["latest", "v3", "two words"])
def test_a_registry_alias_mlflow_refuses_is_a_params_error(alias):
    from pipelines.config import ParamsError, validate_params
    from tests.pipelines.conftest import micro_params

    raw = micro_params()
    raw["tracking"]["registry_alias"] = alias
    with pytest.raises(ParamsError, match=rf"tracking.registry_alias = '{alias}'"):
        validate_params(raw, "params.yaml")
