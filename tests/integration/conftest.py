"""Team mode, tested on one machine: every server binds 127.0.0.1 on a free port and is stopped by the fixture
that started it. The micro project here runs pretrain_mae once (MLflow off) for the tests that compare with it
or push it to a DVC remote."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml

from tests.pipelines.conftest import dvc_repro, make_project


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_params(root: Path, **sections: dict) -> None:
    """Update sections of ``root``'s params.yaml, e.g. ``tracking={"enabled": False}``."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_with_data(source: Path, dest: Path, **sections: dict) -> Path:
    """A fresh micro project at ``dest`` with ``source``'s prepared data, MLflow off and ``sections`` applied."""
    root = make_project(dest)
    shutil.copytree(source / "data" / "classification", root / "data" / "classification")
    set_params(root, tracking={"enabled": False}, **sections)
    return root


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    """A micro project (MLflow off: a store is not what these tests check) after `dvc repro pretrain_mae`,
    its dvc.lock committed."""
    root = make_project(tmp_path_factory.mktemp("team") / "a")
    set_params(root, tracking={"enabled": False})
    dvc_repro(root, "pretrain_mae")
    return root
