"""Classification evaluation: top-k, confusion matrix, linear probe (frozen encoder)."""

from __future__ import annotations

import pytest
import torch

from components.evaluation.classification import confusion_figure, confusion_matrix, evaluate_classifier, topk_accuracy
from components.evaluation.linear_probe import LinearProbe, extract_pooled_features, fit_probe_head, probe_head
from components.models.vit import ViTSpec, create_vit

torch.set_num_threads(1)
SPEC = ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_topk_and_confusion():
    logits = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.1, 0.2, 0.6, 0.1], [0.3, 0.4, 0.2, 0.1]])
    targets = torch.tensor([0, 1, 3])
    acc = topk_accuracy(logits, targets, (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3)
    assert acc[5] == 100.0  # k clipped to the 4 classes
    cm = confusion_matrix(logits.argmax(1), targets, 4)
    assert cm.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert int(cm.sum()) == 3 and int(cm.trace()) == 1
    fig = confusion_figure(cm, ["a", "b", "c", "d"], title="t")
    assert len(fig.axes) == 2


def test_evaluate_classifier_on_a_known_model():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1, 1])
    res = evaluate_classifier(model, [(x[:2], y[:2]), (x[2:], y[2:])], num_classes=2)
    assert res["top1"] == 75.0 and res["n"] == 4 and res["confusion"].tolist() == [[1, 0], [1, 2]]


def test_linear_probe_leaves_the_encoder_unchanged():
    torch.manual_seed(0)
    enc = create_vit(SPEC, drop_path_rate=0.1)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    probe = LinearProbe(enc, num_classes=3, pool="token")
    bn = probe.head[0]
    assert bn.weight is None and bn.bias is None and bn.eps == 1e-6  # BatchNorm without affine
    assert float(probe.head[1].weight.detach().std()) == pytest.approx(0.01, rel=0.3)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    opt = torch.optim.SGD(probe.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    probe.train()
    assert not probe.encoder.training  # drop path stays off in the frozen encoder
    head_before = probe.head[1].weight.clone()
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, probe.head[1].weight)  # the head did learn
    feats, labels = extract_pooled_features(enc, [(torch.randn(4, 3, 16, 16), torch.arange(4))], pool="avg")
    assert feats.shape == (4, SPEC.embed_dim) and labels.tolist() == [0, 1, 2, 3]


def test_probe_head_separates_separable_features_despite_scale():
    """BatchNorm (no affine) lets one lr fit features with a huge offset and scale (MAE Sec. A.2)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(40)  # [120]
    centres = torch.randn(3, 16, generator=g) * 3
    feats = 1000 + 50 * (centres[labels] + 0.3 * torch.randn(120, 16, generator=g))
    head = probe_head(16, 3)
    losses = fit_probe_head(head, feats, labels, epochs=30, batch_size=32, blr=0.1, warmup_epochs=3)
    assert losses[-1] < losses[0]
    pred = head(feats).argmax(1)
    assert (pred == labels).float().mean() == 1.0


@pytest.mark.parametrize(
    "n,batch_size,sizes", [(480, 256, [240, 240]), (481, 256, [241, 240]), (100, 256, [100]), (5, 4, [3, 2])]
)
def test_probe_sees_every_feature_every_epoch_in_equal_batches(n, batch_size, sizes):
    seen = []
    head = probe_head(4, 2)
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    fit_probe_head(head, torch.randn(n, 4), torch.arange(n) % 2, epochs=3, batch_size=batch_size, warmup_epochs=1)
    assert seen == sizes * 3
