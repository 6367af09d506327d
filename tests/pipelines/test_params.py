"""The params schema (pipelines/config.py): a sweep of bad params files, each rejected with one line that
names the file and the key (or line and column); no defaults in code; the micro params as overrides; what
`make repro` and `dvc repro` show for a broken file; every stage re-run by `dvc status` when the schema
or its params change. In process where possible; the few subprocesses check exit code 2, one line on
stderr and that nothing was written."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipelines.config import EncoderArch, Params, ParamsError, load_params, read_yaml, validate_params
from tests.pipelines.conftest import BIN, MICRO, REPO, make_project, merge_overrides, micro_params, project_env

INITS = ["scratch", "mae", "ibot", "cnn"]
DVC_STAGES = [  # the default: seeds 0, 1 and 2
    "prepare",
    "pretrain_mae",
    "pretrain_ibot",
    "baselines",
    *(f"finetune@{i}-{s}" for i in INITS for s in (0, 1, 2)),
    *(f"detect@{m}-10-{s}" for m in ("supervised", "softteacher") for s in (0, 1, 2)),
    "cka",
    "report",
]
# the micro params: detection at 20 %, seeds 0 and 1
MICRO_FINETUNE = {f"finetune@{i}-{s}" for i in INITS for s in (0, 1)}
MICRO_DETECT = {f"detect@{m}-20-{s}" for m in ("supervised", "softteacher") for s in (0, 1)}
MICRO_STAGES = [
    "prepare",
    "pretrain_mae",
    "pretrain_ibot",
    "baselines",
    *sorted(MICRO_FINETUNE),
    *sorted(MICRO_DETECT),
    "cka",
    "report",
]


def _with(raw: dict, key: str, value) -> dict:
    """A deep copy of ``raw`` with the dotted ``key`` set to ``value`` (or removed, for ``DELETE``)."""
    raw = copy.deepcopy(raw)
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


class _Delete:
    def __repr__(self) -> str:  # a stable test id (pytest-xdist's workers must collect the same ids)
        return "DELETE"


DELETE = _Delete()

# (dotted key, bad value, what the one line must contain after "params.yaml: ")
BAD_VALUES = [
    # no lax coercion: a bool or a string is not a number, a number is not a bool or a string
    ("pretrain_mae.epochs", True, "pretrain_mae.epochs = True: Input should be a valid integer"),
    ("pretrain_mae.epochs", "10", "pretrain_mae.epochs = '10': Input should be a valid integer"),
    ("pretrain_mae.epochs", 10.0, "pretrain_mae.epochs = 10.0: Input should be a valid integer"),
    ("finetune.vit.blr", "8e-3", "finetune.vit.blr = '8e-3': Input should be a valid number"),
    ("finetune.crop_scale", ["0.35", 1.0], "finetune.crop_scale.0 = '0.35': Input should be a valid number"),
    ("tracking.enabled", "yes", "tracking.enabled = 'yes': Input should be a valid boolean"),
    ("tracking.enabled", 1, "tracking.enabled = 1: Input should be a valid boolean"),
    ("report.title", 5, "report.title = 5: Input should be a valid string"),
    # every float finite
    ("pretrain_mae.blr", math.inf, "pretrain_mae.blr = inf: Input should be a finite number"),
    ("pretrain_ibot.blr", math.nan, "pretrain_ibot.blr = nan: Input should be a finite number"),
    ("detect.lr", math.inf, "detect.lr = inf: Input should be a finite number"),
    ("pretrain_mae.weight_decay", math.inf, "pretrain_mae.weight_decay = inf: Input should be a finite number"),
    ("finetune.min_lr", -math.inf, "finetune.min_lr = -inf: Input should be a finite number"),
    ("cka.rbf_threshold", math.nan, "cka.rbf_threshold = nan: Input should be a finite number"),
    # integers numpy and torch accept; the seed numpy accepts
    ("runtime.seed", 10**30, f"runtime.seed = {10**30}: out of range"),
    ("runtime.seed", 2**32, f"runtime.seed = {2**32}: out of range"),
    ("runtime.seed", -1, "runtime.seed = -1: Input should be greater than or equal to 0"),
    ("detect.steps", 10**20, f"detect.steps = {10**20}: out of range"),
    (
        "detect.model.anchor_sizes",
        [8, 16, 32, 64, 10**12],
        "detect.model.anchor_sizes = [8, 16, 32, 64, 1000000000000]: out of",
    ),
    # ranges
    ("pretrain_mae.batch_size", 0, "pretrain_mae.batch_size = 0: Input should be greater than or equal to 1"),
    ("pretrain_mae.mask_ratio", 1.0, "pretrain_mae.mask_ratio = 1.0: Input should be less than 1"),
    (
        "prepare.classification.labeled_percents",
        [150],
        "prepare.classification.labeled_percents = 150.0: each percent must be in (0, 100]",
    ),
    ("finetune.eval_crop_pct", 0, "finetune.eval_crop_pct = 0: Input should be greater than 0"),
    (
        "finetune.early_stop.holdout_fraction",
        1.0,
        "finetune.early_stop.holdout_fraction = 1.0: Input should be less than 1",
    ),
    (
        "finetune.early_stop.holdout_fraction",
        -0.1,
        "finetune.early_stop.holdout_fraction = -0.1: Input should be greater than or equal to 0",
    ),
    ("finetune.early_stop.patience", 0, "finetune.early_stop.patience = 0: Input should be greater than or equal to 1"),
    ("finetune.early_stop.patience", 2.5, "finetune.early_stop.patience = 2.5: Input should be a valid integer"),
    ("finetune.early_stop.patience", DELETE, "finetune.early_stop.patience: missing key"),
    # cross-field rules
    ("pretrain_mae.min_lr", 1.0, "pretrain_mae.min_lr = 1.0: must be <= the peak lr"),
    ("pretrain_ibot.min_lr", 1.0, "pretrain_ibot.min_lr = 1.0: must be <= the peak lr"),
    ("finetune.min_lr", 1.0, "finetune.min_lr = 1.0: must be <= the peak lr"),
    ("pretrain_mae.warmup_epochs", 2, "pretrain_mae.warmup_epochs = 2.0: must be < epochs (2): the warm-up must end"),
    ("pretrain_ibot.warmup_epochs", 3, "pretrain_ibot.warmup_epochs = 3.0: must be < epochs (2)"),
    ("finetune.warmup_epochs", 2, "finetune.warmup_epochs = 2: must be < epochs (2)"),
    (
        "finetune.linear_probe.warmup_epochs",
        5,
        "finetune.linear_probe.warmup_epochs = 5: must be < linear_probe.epochs",
    ),
    ("detect.warmup_steps", 4, "detect.warmup_steps = 4: must be < steps (4)"),
    (
        "pretrain_ibot.loss.warmup_teacher_temp_epochs",
        2,
        "pretrain_ibot.loss.warmup_teacher_temp_epochs = 2: must be < epochs",
    ),
    ("pretrain_ibot.multicrop.local_size", 64, "pretrain_ibot.multicrop.local_size = 64: must be <= the global crop"),
    (
        "pretrain_ibot.multicrop.global_scale",
        [0.1, 0.2],
        "pretrain_ibot.multicrop.local_scale = [0.05, 0.25]: max must be <=",
    ),
    ("prepare.detection.min_objects", 9, "prepare.detection.min_objects = 9: must be <= max_objects"),
    (
        "finetune.labeled_percent",
        30,
        "finetune.labeled_percent = 30.0: must be one of prepare.classification.labeled_percents",
    ),
    ("pretrain_ibot.knn.fold", 1, "pretrain_ibot.knn.fold = 1: must be < prepare.classification.folds (1)"),
    ("detect.fold", 1, "detect.fold = 1: must be < prepare.detection.folds (1)"),
    ("detect.model.norm", "frozen_bn", "detect.model.norm = 'frozen_bn': a ResNet trained from scratch needs norm gn"),
    # unknown and missing keys, missing sections
    ("pretrain_mae.model.no_such_knob", 1, "pretrain_mae.model.no_such_knob: unknown key (allowed: depth, embed_dim"),
    ("pretrain_mae.epochs", DELETE, "pretrain_mae.epochs: missing key"),
    ("prepare.classification.style", DELETE, "prepare.classification.style: missing key"),
    ("runtime", DELETE, "runtime: missing key"),
    ("cka", DELETE, "cka: missing key"),
    ("pretrain_mae", None, "pretrain_mae: empty section (every key is required)"),
    (
        "detect.views.short_side_range",
        [400, 800, 1200],
        "detect.views.short_side_range = (400, 800, 1200): Tuple should have at",
    ),
    ("pretrain_ibot.model.preset", DELETE, "pretrain_ibot.model.preset: missing key"),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v!r}"[:60] for k, v, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key(key, value, expected):
    with pytest.raises(ParamsError) as e:
        validate_params(_with(micro_params(), key, value), "params.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("params.yaml: "), message
    assert expected in message, message


@pytest.mark.parametrize("old", ["pretrain_mae.base_lr", "pretrain_ibot.base_lr"])
def test_an_old_name_of_the_base_learning_rate_is_one_line_naming_the_new_key(old, tmp_path):
    """The base learning rate is ``blr`` in every section (MAE's name): a params file still using an old name
    fails with one line that names the new key, not pydantic's "extra inputs are not permitted"."""
    section = old.split(".")[0]
    raw = _with(_with(micro_params(), f"{section}.blr", DELETE), old, 1.0e-3)
    with pytest.raises(ParamsError) as e:
        validate_params(raw, "params.yaml")
    assert str(e.value) == f"params.yaml: {old}: renamed to {section}.blr"
    path = tmp_path / "params.yaml"  # and as `python -m pipelines.config` reports it: exit 2, one line
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr == f"error: {path}: {old}: renamed to {section}.blr\n"


def test_every_base_learning_rate_is_named_blr():
    """No section names a base learning rate otherwise; the one ``lr`` left is detect's absolute lr."""

    def fields(model: type[BaseModel], where: str = ""):
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from fields(ann, f"{where}{name}.")
            else:
                yield f"{where}{name}"

    names = list(fields(Params))
    assert {n for n in names if n.split(".")[-1] in ("base_lr", "lr")} == {"detect.lr"}
    assert {"pretrain_mae.blr", "pretrain_ibot.blr", "finetune.vit.blr", "finetune.cnn.blr"} <= set(names)


def test_the_edges_of_the_ranges_are_accepted():
    """The same rules let through the values at their limits (the rules are not simply stricter)."""
    raw = micro_params()
    for key, value in [
        ("runtime.seed", 2**32 - 1),
        ("pretrain_mae.warmup_epochs", 1.5),
        ("pretrain_mae.blr", 1),
        ("detect.warmup_steps", 3),
        ("pretrain_ibot.multicrop.local_size", 32),
        ("pretrain_mae.min_lr", 1.5e-3 * 16 / 256),
    ]:
        raw = _with(raw, key, value)
    params = validate_params(raw)
    assert params.runtime.seed == 2**32 - 1 and params.pretrain_mae.blr == 1.0


BAD_FILES = [
    # (name, file bytes, what the one line must contain; {path} is the file)
    ("empty", b"", "{path}: empty file; it must hold every section (runtime, tracking, prepare"),
    ("comments only", b"# nothing\n", "{path}: empty file"),
    ("a list", b"- runtime\n", "{path}: the top level must be a mapping of sections, got list"),
    (
        "duplicate key",
        b"runtime:\n  seed: 0\n  device: cpu\n  seed: 1\n",
        "{path}:4:3: not valid YAML: duplicate key 'seed' (first at line 2)",
    ),
    ("duplicate section", b"report:\n  title: a\nreport:\n  title: b\n", "{path}:3:1: not valid YAML"),
    (
        "not UTF-8",
        "runtime:\n  seed: 0\nreport:\n  title: caf\u00e9\n".encode("latin-1"),
        "{path}: not UTF-8 text: byte 0xe9 at offset 39 (line 4)",
    ),
    ("syntax", b"runtime:\n  seed: [0\n", "{path}:3:1: not valid YAML: while parsing a flow sequence"),
    ("tab", b"runtime:\n\tseed: 0\n", "{path}:2:1: not valid YAML"),
    ("a python object", b"runtime: !!python/object:os.system {}\n", "{path}:1:10: not valid YAML"),
]


@pytest.mark.parametrize("name, data, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_file_is_one_line_naming_the_file_and_where(tmp_path, name, data, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    message = str(e.value)
    assert "\n" not in message, message
    assert expected.format(path=path) in message, message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nowhere.yaml: params file not found"):
        load_params(tmp_path / "nowhere.yaml")


# --------------------------------------------------------------------------- through a stage's command line
def _stage_exit(tmp_path: Path, data: bytes) -> subprocess.CompletedProcess:
    """``python -m pipelines.prepare --params bad.yaml`` in an empty directory (the code on PYTHONPATH)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "bad.yaml").write_bytes(data)
    env = {**project_env(work), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(BIN / "python"), "-m", "pipelines.prepare", "--params", "bad.yaml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _micro_bytes(**edits) -> bytes:
    raw = micro_params()
    for key, value in edits.items():
        raw = _with(raw, key.replace("__", "."), value)
    return yaml.safe_dump(raw, sort_keys=False).encode()


STAGE_CASES = [  # the two the sweep found ending in exit 1 and a Python message; the other cases share their path
    (
        "30-digit seed",
        lambda: _micro_bytes(runtime__seed=10**30),
        "runtime.seed = 1000000000000000000000000000000: out of range",
    ),
    (
        "not UTF-8",
        lambda: _micro_bytes(report__title="x").replace(b"title: x", b"title: caf\xe9"),
        "bad.yaml: not UTF-8 text: byte 0xe9",
    ),
]


@pytest.mark.parametrize("name, data, expected", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_a_stage_exits_2_with_one_line_and_writes_nothing(tmp_path, name, data, expected):
    proc = _stage_exit(tmp_path, data())
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: prepare: bad.yaml") and expected in lines[0], lines[0]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["bad.yaml"]  # no data/, metrics/, mlflow.db


# --------------------------------------------------------------------------- one source of values
def _sections(model: type[BaseModel], where: str = ""):
    for name, field in model.model_fields.items():
        yield f"{where}{name}", model, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _sections(ann, f"{where}{name}.")


def test_the_schema_has_no_defaults_of_its_own():
    """params.yaml is the one source: every key is required, except a ViT preset's dimension overrides
    (absent: the preset's own value). Keys added to the schema later are held to the same rule."""
    defaults = {key: field.default for key, model, field in _sections(Params) if not field.is_required()}
    optional = {
        key
        for key in defaults
        if key.rsplit(".", 1)[0] in {"pretrain_mae.model", "pretrain_ibot.model", "finetune.vit.scratch_model"}
    }
    assert {k: v for k, v in defaults.items() if k not in optional} == {}
    assert set(EncoderArch.model_fields) - {"preset"} == {k.rsplit(".", 1)[1] for k in optional}
    assert all(v is None for v in defaults.values())


def test_the_committed_params_files_validate_and_are_strict_about_their_keys():
    for path in (REPO / "params.yaml", REPO / "params" / "gpu-vit-b16.yaml"):
        raw = read_yaml(path)
        load_params(path)
        for key, _, field in _sections(Params):
            parts = key.split(".")
            node = raw
            for part in parts[:-1]:
                node = node[part]
            assert parts[-1] in node or not field.is_required(), f"{path.name}: {key} not written"


def test_the_micro_params_are_overrides_that_each_change_a_value():
    base, overrides = read_yaml(REPO / "params.yaml"), read_yaml(MICRO)
    base_params = validate_params(base).model_dump(mode="json")
    micro = validate_params(micro_params()).model_dump(mode="json")

    def leaves(d, where=""):
        for k, v in d.items():
            yield from leaves(v, f"{where}{k}.") if isinstance(v, dict) else [(f"{where}{k}", v)]

    def get(d, key):
        for part in key.split("."):
            d = d[part]
        return d

    for key, _ in leaves(overrides):
        assert get(micro, key) != get(base_params, key), f"{MICRO.name}: {key} repeats params.yaml's value"
    # and nothing else differs: the micro run is params.yaml plus exactly these overrides
    changed = {k for k, v in leaves(micro) if v != get(base_params, k)}
    assert changed == {k for k, _ in leaves(overrides)}


def test_an_override_that_does_not_fit_params_yaml_is_an_error():
    base = read_yaml(REPO / "params.yaml")
    with pytest.raises(ParamsError, match=r"pretrain_mae.no_such_knob: unknown key"):
        validate_params(merge_overrides(base, {"pretrain_mae": {"no_such_knob": 1}}))
    with pytest.raises(ParamsError, match=r"no_such_section: unknown key"):
        validate_params(merge_overrides(base, {"no_such_section": {"a": 1}}))
    with pytest.raises(ValueError, match=r"pretrain_mae = 3: overrides a whole section"):
        merge_overrides(base, {"pretrain_mae": 3})
    with pytest.raises(ValueError, match=r"pretrain_mae.epochs: a mapping overrides"):
        merge_overrides(base, {"pretrain_mae": {"epochs": {"a": 1}}})
    merged = merge_overrides(base, {"pretrain_mae": {"epochs": 3}})
    assert merged["pretrain_mae"]["epochs"] == 3
    assert merged["pretrain_mae"]["batch_size"] == base["pretrain_mae"]["batch_size"]
    assert base["pretrain_mae"]["epochs"] != 3  # the base is not changed in place


# --------------------------------------------------------------------------- make repro and dvc repro on a broken file
BROKEN = b"runtime:\n  device: cpu\n  seed: [0\n"


def _fake_bin(tmp_path: Path) -> Path:
    """A bin directory with the real python and a `dvc` that only leaves a mark that it ran."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!/bin/sh\nexec '{sys.executable}' \"$@\"\n")
    (fake / "python").chmod(0o755)
    (fake / "dvc").write_text(f"#!/bin/sh\necho ran > '{tmp_path / 'dvc-ran'}'\n")
    (fake / "dvc").chmod(0o755)
    return fake


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_repro_checks_params_first_and_prints_one_line_with_line_and_column(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_bytes(BROKEN)
    fake = _fake_bin(tmp_path)
    env = {**project_env(work), "PYTHONPATH": str(REPO)}
    cmd = ["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(work), "repro", f"BIN={fake}", "STAMP="]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not (tmp_path / "dvc-ran").exists(), proc.stderr
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert ours == [
        "error: params.yaml:4:1: not valid YAML: while parsing a flow sequence "
        "expected ',' or ']', but got '<stream end>'"
    ]
    # a valid file goes on to dvc repro
    (work / "params.yaml").write_text(yaml.safe_dump(micro_params()))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "dvc-ran").exists(), proc.stderr


def test_dvc_repro_on_a_broken_file_stops_with_dvcs_own_parser_message(tmp_path):
    """dvc.yaml interpolates ${runtime.launcher} and ${prepare.detection.labeled_percents}, so DVC reads
    params.yaml itself before any stage starts: a YAML error is DVC's several-line message (exit 255),
    which is why `make repro` checks the file first. Nothing runs."""
    root = make_project(tmp_path / "p")
    (root / "params.yaml").write_bytes(BROKEN)
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=root, env=project_env(root), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 255
    assert "unable to read: 'params.yaml', YAML file structure is corrupted" in proc.stderr + proc.stdout
    assert not (root / "data").exists() and not (root / "metrics").exists()


# --------------------------------------------------------------------------- dvc status sees the schema and the params
def _committed_project(tmp_path: Path) -> Path:
    """A micro project whose dvc.lock records every stage as done, without running any: each output is a
    placeholder file or directory and `dvc commit` hashes what is there (a few seconds, no training)."""
    from dvc.repo import Repo

    root = make_project(tmp_path / "p")
    with contextlib.chdir(root), Repo(str(root)) as repo:  # dvc resolves some paths against the working directory
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")
        repo.commit(force=True)
    return root


def _dvc_status(root: Path) -> set[str]:
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        return set(repo.status())


def _edit_params(root: Path, key: str, value) -> None:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(_with(yaml.safe_load(path.read_text()), key, value), sort_keys=False))


def test_dvc_status_reports_the_stages_a_change_of_the_schema_or_of_params_yaml_affects(tmp_path):
    root = _committed_project(tmp_path)
    assert _dvc_status(root) == set()
    # every stage depends on the schema module: a change there re-runs them all
    schema = root / "pipelines" / "config.py"
    original = schema.read_text()
    schema.write_text(original + "\n# a change\n")
    assert _dvc_status(root) == set(MICRO_STAGES)
    schema.write_text(original)
    assert _dvc_status(root) == set()
    # a value in params.yaml re-runs the stages that read it, and only those
    _edit_params(root, "pretrain_mae.epochs", 3)
    assert _dvc_status(root) == {"pretrain_mae"}
    _edit_params(root, "pretrain_mae.model.depth", 3)  # detect builds a scratch ViT backbone of this shape
    assert _dvc_status(root) == {"pretrain_mae", *MICRO_DETECT}
    _edit_params(root, "finetune.epochs", 3)
    assert _dvc_status(root) == {"pretrain_mae", *MICRO_DETECT, "baselines", "cka", *MICRO_FINETUNE}


def test_the_dvc_stage_lists_above_are_dvc_yamls():
    from dvc.repo import Repo

    with contextlib.chdir(REPO), Repo(str(REPO)) as repo:
        assert sorted(s.addressing for s in repo.index.stages) == sorted(DVC_STAGES)
    assert micro_params()["prepare"]["detection"]["labeled_percents"] == [20]
