"""Each stage builds its augmentations from its params: a flip, blur, solarization or
colour op set to probability 0 (or off) is not in the transform the stage builds; the defaults are the papers'."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import v2

from components.data.box_transforms import ViewConfig
from pipelines import finetune, pretrain_ibot, pretrain_mae
from pipelines.config import Finetune, PretrainIBOT, PretrainMAE
from pipelines.detect import views_config
from tests.pipelines.conftest import params_section


def _ops(compose) -> list:
    """Every transform inside ``compose``, RandomApply and nested Compose opened."""
    out = []
    for t in getattr(compose, "transforms", [compose]):
        out += [t, *_ops(t)] if isinstance(t, (T.Compose, v2.Compose, T.RandomApply, v2.RandomApply)) else [t]
    return out


def _count(compose, kind) -> int:
    names = kind if isinstance(kind, tuple) else (kind,)
    return sum(type(t).__name__ in names for t in _ops(compose))


def test_pretrain_mae_flip_follows_params():
    default = pretrain_mae.train_transform(params_section(PretrainMAE, "pretrain_mae"), 32)
    flips = [t for t in _ops(default) if isinstance(t, T.RandomHorizontalFlip)]
    assert len(flips) == 1 and flips[0].p == 0.5
    assert (
        _count(
            pretrain_mae.train_transform(params_section(PretrainMAE, "pretrain_mae", hflip=0.0), 32),
            "RandomHorizontalFlip",
        )
        == 0
    )
    assert (
        pretrain_mae.train_transform(params_section(PretrainMAE, "pretrain_mae", hflip=0.2), 32).transforms[1].p == 0.2
    )


def test_pretrain_ibot_multicrop_follows_params():
    default = pretrain_ibot.multicrop_augmentation(params_section(PretrainIBOT, "pretrain_ibot"), 32)
    views = (default.global_1, default.global_2, default.local)
    assert [_count(v, "RandomHorizontalFlip") for v in views] == [1, 1, 1]
    assert [_count(v, "GaussianBlur") for v in views] == [1, 1, 1]
    assert [_count(v, "RandomSolarize") for v in views] == [0, 1, 0]
    off = params_section(
        PretrainIBOT,
        "pretrain_ibot",
        multicrop={"hflip": 0, "blur_p": [0, 0, 0], "solarize_p": 0, "color_jitter_p": 0, "grayscale_p": 0},
    )
    aug = pretrain_ibot.multicrop_augmentation(off, 32)
    for view in (aug.global_1, aug.global_2, aug.local):
        assert (
            _count(view, ("RandomHorizontalFlip", "GaussianBlur", "RandomSolarize", "ColorJitter", "RandomGrayscale"))
            == 0
        )
        assert _count(view, "RandomResizedCrop") == 1
    some = pretrain_ibot.multicrop_augmentation(
        params_section(PretrainIBOT, "pretrain_ibot", multicrop={"blur_p": [0, 0.3, 0], "solarize_p": 0.5}), 32
    )
    assert [t.p for t in _ops(some.global_2) if type(t).__name__ in ("GaussianBlur", "RandomSolarize")] == [0.3, 0.5]
    assert _count(some.global_1, "GaussianBlur") == 0


def test_finetune_flip_follows_params():
    mean, std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    train, _ = finetune.transforms(params_section(Finetune, "finetune"), 32, mean, std)
    flips = [t for t in _ops(train) if isinstance(t, (T.RandomHorizontalFlip, v2.RandomHorizontalFlip))]
    assert len(flips) == 1 and flips[0].p == 0.5
    train, evaluation = finetune.transforms(params_section(Finetune, "finetune", hflip=0.0), 32, mean, std)
    assert _count(train, "RandomHorizontalFlip") == 0 and _count(train, "RandomResizedCropAndInterpolation") == 1
    assert _count(evaluation, "RandomHorizontalFlip") == 0


def test_detection_flip_follows_params():
    from pipelines.config import Detect

    assert views_config(params_section(Detect, "detect")).flip_p == 0.5
    cfg = params_section(Detect, "detect", views={"flip_p": 0.0})
    assert isinstance(views_config(cfg), ViewConfig) and views_config(cfg).flip_p == 0.0


def test_detection_colour_op_follows_params(monkeypatch):
    """detect.views.colour false leaves the colour op out of the labeled and the strong views (default: in)."""
    import torch

    from components.data import box_transforms
    from pipelines.config import Detect

    assert views_config(params_section(Detect, "detect")).colour is True
    calls = []
    real = box_transforms.random_colour
    monkeypatch.setattr(box_transforms, "random_colour", lambda v: calls.append(v) or real(v))
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = box_transforms.identity_view(image, torch.tensor([[4.0, 4.0, 20.0, 20.0]]), torch.tensor([1]))
    for colour, expected in ((True, 2), (False, 0)):
        calls.clear()
        views = views_config(params_section(Detect, "detect", views={"colour": colour}))
        views.labeled(view), views.strong(view), views.weak(view)
        assert len(calls) == expected, colour
