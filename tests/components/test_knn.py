"""Weighted k-NN on L2-normalised features (DINO eval_knn, k = 20, T = 0.07)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from components.evaluation.knn import extract_features, knn_accuracy, knn_classify


def _reference(train, train_labels, test, num_classes, k, T):
    """DINO's formula written out per test sample."""
    train = train / train.norm(dim=1, keepdim=True)
    test = test / test.norm(dim=1, keepdim=True)
    out = torch.zeros(test.shape[0], num_classes)
    for i in range(test.shape[0]):
        sims = train @ test[i]
        for j in sims.argsort(descending=True)[:k]:
            out[i, train_labels[j]] += torch.exp(sims[j] / T)
    return out


def test_matches_the_weighted_vote_formula():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    got = knn_classify(train, labels, test, num_classes=4, k=20, T=0.07, chunk_size=3)
    torch.testing.assert_close(got, _reference(train, labels, test, 4, 20, 0.07), rtol=1e-4, atol=1e-4)


def test_close_neighbours_outvote_a_distant_majority():
    # One training point right on the query (label 0) and three far ones (label 1): with T = 0.07 the
    # exp(sim / T) weights let the single close neighbour win; an unweighted vote would pick 1.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    assert int(knn_classify(train, labels, test, 2, k=4, T=0.07).argmax()) == 0
    assert int(knn_classify(train, labels, test, 2, k=4, T=100.0).argmax()) == 1  # near-uniform weights


def test_separable_clusters_are_classified_perfectly_and_scale_does_not_matter():
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(3, 16) * 5
    train_labels = torch.arange(3).repeat(30)
    train = centers[train_labels] + 0.3 * torch.randn(90, 16, generator=g)
    test_labels = torch.arange(3).repeat(10)
    test = centers[test_labels] + 0.3 * torch.randn(30, 16, generator=g)
    assert knn_accuracy(train, train_labels, test, test_labels, 3) == 100.0
    scaled = train * torch.rand(90, 1, generator=g) * 10  # L2-normalised: per-sample scale is irrelevant
    torch.testing.assert_close(knn_classify(scaled, train_labels, test, 3), knn_classify(train, train_labels, test, 3))


def test_k_larger_than_the_training_set_uses_all_of_it():
    train, labels = torch.randn(5, 4), torch.tensor([0, 1, 1, 2, 2])
    scores = knn_classify(train, labels, torch.randn(2, 4), 3, k=20)
    assert scores.shape == (2, 3) and bool((scores > 0).all())  # every training sample voted


def test_extract_features_restores_mode_and_collects_all_samples():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 6))
    data = TensorDataset(torch.randn(10, 3, 2, 2), torch.arange(10) % 3)
    feats, labels = extract_features(model, DataLoader(data, batch_size=4))
    assert feats.shape == (10, 6) and torch.equal(labels, torch.arange(10) % 3)
    assert model.training  # put back into training mode
    again, _ = extract_features(model, DataLoader(data, batch_size=3))
    torch.testing.assert_close(feats, again)  # eval mode: dropout off, deterministic


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="labels"):
        knn_classify(torch.randn(4, 2), torch.zeros(3, dtype=torch.long), torch.randn(1, 2), 2)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        extract_features(
            nn.Identity(), DataLoader(TensorDataset(torch.randn(2, 3, 2, 2), torch.zeros(2)), batch_size=2)
        )
