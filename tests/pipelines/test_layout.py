"""pipelines/layout.py is the one place for the stages' paths and matrix lists: it agrees with dvc.yaml, and its
figure writer is atomic, closes the figure and logs it through the stage context."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipelines import layout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def outs(stage: dict) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics") for o in stage.get(kind, [])}


def test_the_matrix_lists_are_dvc_yamls(stages):
    assert tuple(stages["finetune"]["matrix"]["init"]) == layout.INITS
    assert tuple(stages["detect"]["matrix"]["method"]) == layout.METHODS
    for stage in ("finetune", "detect"):  # every pretrained encoder a stage may read is one of its deps
        assert {str(d) for d in layout.ENCODER_DIRS.values()} <= set(stages[stage]["deps"])
    assert set(layout.ENCODER_DIRS) <= set(layout.INITS)


def test_stage_paths_are_the_outs_dvc_yaml_declares(stages):
    assert all("pipelines/layout.py" in stage["deps"] for stage in stages.values())  # a changed path re-runs them
    assert {str(layout.CLASSIFICATION), str(layout.DETECTION)} <= outs(stages["prepare"])
    assert str(layout.SOURCES) in stages["prepare"]["deps"]
    for stage in ("pretrain_mae", "pretrain_ibot"):
        declared = outs(stages[stage])
        assert str(layout.stage_dir(layout.MODELS, stage)) in declared
        assert str(layout.stage_dir(layout.CHECKPOINTS, stage)) not in declared  # resumable state, not a DVC out
        assert str(layout.metrics_file(stage)) in declared
        assert str(layout.CLASSIFICATION) in stages[stage]["deps"]
    for stage in ("finetune", "detect"):  # matrix items: <kind>/<stage>/<key>
        declared = outs(stages[stage])
        assert str(layout.stage_dir(layout.MODELS, stage, "${key}")) in declared
        assert str(layout.stage_dir(layout.CHECKPOINTS, stage, "${key}")) not in declared
        assert str(layout.metrics_file(stage, "${key}")) in declared
    assert str(layout.CLASSIFICATION) in stages["finetune"]["deps"]
    assert str(layout.DETECTION) in stages["detect"]["deps"]
    assert str(layout.finetuned_dir("cnn", "${finetune.seeds[0]}")) in stages["cka"]["deps"]
    assert str(layout.REPORTS) in outs(stages["report"])
    assert str(layout.metrics_file("claims")) in outs(stages["report"])


def test_split_names_are_the_files_prepare_writes(tmp_path):
    from pipelines.config import ClassificationData
    from pipelines.prepare import classification_dataset
    from tests.pipelines.conftest import params_section

    cfg = params_section(
        ClassificationData,
        "prepare.classification",
        image_size=16,
        train_per_class=4,
        val_per_class=1,
        labeled_percents=[50, 12.5],
        folds=2,
    )
    classification_dataset(cfg, 0, "raise", tmp_path)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "splits").iterdir())
    expected = sorted(layout.labeled_split_name(p, k) for p in (50, 12.5) for k in range(2))
    assert written == expected
    assert layout.labeled_split_file(12.5, 1) == Path("data/classification/splits/labeled_12.5_fold1.json")
    assert layout.detection_split_dir(10.0, 0) == Path("data/detection/splits/10_fold0")
    assert layout.pct_name(10.0) == "10" and layout.pct_name(0.5) == "0.5"


class FakeContext:
    def __init__(self):
        self.logged: list[Path] = []

    def log_figure(self, path: Path) -> None:
        assert path.is_file()  # logged only once it is in place
        self.logged.append(path)


def test_write_figure_is_atomic_closes_the_figure_and_logs_it(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    ctx = FakeContext()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = layout.write_figure(fig, tmp_path / "a" / "f.png", ctx)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert ctx.logged == [path]
    with Image.open(path) as im:
        assert im.size == (640, 480)  # 6.4 x 4.8 in at the default dpi 100
    layout.write_figure(Image.new("RGB", (8, 6)), tmp_path / "sheet.png", ctx)  # a PIL contact sheet
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size == (8, 6)

    # a failed write leaves the previous file, no temporary file, and the figure closed; nothing is logged
    fig2, _ = plt.subplots()

    def broken(self, *a, **k):
        raise OSError("disk full")

    before = path.read_bytes()
    monkeypatch.setattr(type(fig2), "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        layout.write_figure(fig2, path, ctx)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["f.png"]
    assert not plt.fignum_exists(fig2.number)
    assert len(ctx.logged) == 2
