"""The cka stage through `dvc repro` on the micro params, and its error path.

Upstream weights are made here (prepare runs for real): the "fine-tuned" ViT is a classifier holding
the MAE encoder's own weights, so its blocks must match the MAE blocks with CKA 1 exactly when both
models really see the same images with the same normalisation.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from components.analysis.cka import MinibatchCKA, cka
from components.models.classifier import build_cnn_classifier, build_vit_classifier, cnn_meta, save_classifier, vit_meta
from components.models.vit import ViTSpec, create_vit, save_encoder
from pipelines.cka import equal_batches, held_out_sample
from pipelines.results import read_results
from tests.pipelines.conftest import BIN, make_project, run

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _upstream(root, classes: list[str]) -> None:
    spec = ViTSpec.from_preset("vit_micro_patch4_32", embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    for i, stage in enumerate(("pretrain_mae", "pretrain_ibot")):
        torch.manual_seed(i)
        save_encoder(create_vit(spec), spec, root / "models" / stage, source=stage, mean=MEAN, std=STD)
    vit, spec = build_vit_classifier(len(classes), encoder_dir=root / "models" / "pretrain_mae", global_pool="avg")
    save_classifier(vit, root / "models" / "finetune" / "mae-0", vit_meta(spec, len(classes), "avg", classes))
    cnn = build_cnn_classifier("resnet10", len(classes), 32, width=8)
    save_classifier(cnn, root / "models" / "finetune" / "cnn-0", cnn_meta("resnet10", len(classes), 32, 8, classes))


@pytest.fixture(scope="module")
def cka_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("cka") / "project")
    run(root, str(BIN / "dvc"), "repro", "prepare")
    classes = json.loads((root / "data" / "classification" / "index.json").read_text())["classes"]
    _upstream(root, classes)
    return root


def test_cka_through_dvc_repro_writes_matrices_and_heatmaps(cka_project):
    root = cka_project
    run(root, str(BIN / "dvc"), "repro", "--single-item", "cka")
    m = read_results(root / "metrics" / "cka.json")
    val = len(json.loads((root / "data" / "classification" / "index.json").read_text())["val"])
    assert m["images"] == val and m["batches"] == -(-val // 16) and m["debiased"] and m["kernel"] == "linear"
    vit_layers = ["blocks.0", "blocks.1"]
    cnn_layers = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert [m["models"][k]["layers"] for k in ("mae", "ibot", "finetuned", "cnn")] == [vit_layers] * 3 + [cnn_layers]
    assert m["models"]["finetuned"]["mean"] == MEAN  # a fine-tuned ViT is fed like its encoder
    order = ["mae", "ibot", "finetuned", "cnn"]
    expected = {f"{a}__{b}" for i, a in enumerate(order) for b in order[i:]}
    assert set(m["pairs"]) == expected and set(m["summary"]) == expected
    for key, pair in m["pairs"].items():
        a, b = key.split("__")
        mat = torch.tensor(pair["cka"])
        assert pair["row_layers"] == [f"{a}/{n}" for n in m["models"][a]["layers"]] and pair["col_layers"] == [
            f"{b}/{n}" for n in m["models"][b]["layers"]
        ]
        assert mat.shape == (len(pair["row_layers"]), len(pair["col_layers"]))
        assert torch.isfinite(mat).all() and mat.max() <= 1 + 1e-5
        if a == b:  # a model with itself: symmetric, ones on the diagonal
            assert torch.allclose(mat, mat.T, atol=1e-6) and torch.allclose(
                mat.diagonal(), torch.ones(len(mat)), atol=1e-5
            )
        assert (root / "plots" / "cka" / f"{key}.png").stat().st_size > 2000
    # same weights, same images, same normalisation: corresponding blocks match exactly
    assert torch.allclose(torch.tensor(m["pairs"]["mae__finetuned"]["cka"]).diagonal(), torch.ones(2), atol=1e-5)
    assert m["summary"]["mae__finetuned"]["diagonal"] == pytest.approx(1.0, abs=1e-5)
    assert m["summary"]["mae__ibot"]["diagonal"] < 0.999  # different random encoders are not identical
    assert (root / "plots" / "cka" / "summary.png").stat().st_size > 5000
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "cka" in lock["stages"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id], "tags.`mimflow.stage` = 'cka'")
    assert runs and runs[0].data.params["images"] == str(val)  # a constant of the run: a param, not a metric chart
    assert "summary.mae__cnn.mean" in runs[0].data.metrics
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "figures")}
    assert "figures/mae__cnn.png" in artifacts and "figures/summary.png" in artifacts


def test_a_layer_pattern_matching_nothing_is_one_line_naming_the_key_and_the_layers(cka_project):
    root = cka_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["cka"]["cnn_layers"] = ["blocks.*"]
    params["tracking"]["enabled"] = False  # the error comes before any tracking matters
    bad = root / "bad.params.yaml"
    bad.write_text(yaml.safe_dump(params))
    proc = run(root, str(BIN / "python"), "-m", "pipelines.cka", "--params", str(bad), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "cka.cnn_layers" in last and "'blocks.*' matches no module" in last and "layer1.0" in last, last


@pytest.mark.parametrize("n, batch_size", [(48, 16), (801, 256), (9, 8), (4, 8), (1000, 1000), (1001, 1000), (17, 8)])
def test_equal_batches_take_every_image_once_in_order_and_none_is_tiny(n, batch_size):
    batches = equal_batches(n, batch_size)
    assert [i for b in batches for i in b] == list(range(n))
    sizes = [len(b) for b in batches]
    assert len(batches) == -(-n // batch_size) and max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 4


def test_minibatches_of_a_class_sorted_index_give_the_full_data_cka():
    """Minibatch CKA estimates the full-data CKA only if every batch is a random sample (Nguyen et al.
    2021 Sec. 3.1). On an index listed class by class (as every index is), batches cut in index order
    hold two classes each and overstate the CKA of two class-specific layers (here 0.62 for 0.37);
    the stage's fixed random order recovers the full-data value."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(100)  # [800], class by class
    centres = torch.randn(8, 16, generator=g)
    x = centres[labels] + 1.5 * torch.randn(800, 16, generator=g)  # two layers sharing the class structure,
    y = centres[labels] @ torch.randn(16, 16, generator=g) + 1.5 * torch.randn(800, 16, generator=g)  # not the noise
    full = cka(x.double(), y.double(), debiased=True)

    def minibatch(order: list[int]) -> float:
        acc = MinibatchCKA(["x", "y"])
        for batch in equal_batches(len(order), 256):
            idx = torch.tensor([order[i] for i in batch])
            acc.update({"x": x[idx], "y": y[idx]})
        return float(acc.compute()[0, 1])

    sample = held_out_sample(list(range(800)), None, seed=0)
    assert sorted(sample) == list(range(800)) and sample == held_out_sample(list(range(800)), None, seed=0)
    assert minibatch(list(range(800))) > full + 0.05  # index order: biased
    assert minibatch(sample) == pytest.approx(full, abs=0.02)
    subset = held_out_sample(list(range(800)), 200, seed=0)
    assert len(subset) == 200 and len(set(labels[subset].tolist())) == 8  # max_images spans every class
