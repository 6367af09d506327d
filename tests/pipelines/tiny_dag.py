"""A tiny DVC project for the flow's tests: four shell-cheap stages a -> (b, c) -> d in a temp git repo, no
torch, so Prefect's graph, DVC's skip and the parallel workspaces are tested in seconds. Each stage appends
its start and end times to the file named by $TICKS (outside DVC's view), so a test can tell which ran,
and when."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import yaml

from tests.pipelines.conftest import REPO, micro_params, project_env

STEP = textwrap.dedent(
    """
    import json, os, sys, time
    name, deps = sys.argv[1], sys.argv[2:]
    ticks = os.environ.get("TICKS")
    if ticks:
        open(ticks, "a").write(f"{name} start {time.time()}\\n")
    cfg = open(f"{name}.cfg").read().strip() if os.path.exists(f"{name}.cfg") else "ok"
    if cfg != "ok":
        print(f"error: {name}: {name}.cfg = {cfg!r}: must be 'ok'", file=sys.stderr)
        sys.exit(2)
    time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
    text = name + "".join(open(f"{d}.txt").read() for d in deps)
    open(f"{name}.txt", "w").write(text)
    os.makedirs("metrics", exist_ok=True)
    json.dump({"length": len(text)}, open(f"metrics/{name}.json", "w"))
    if ticks:
        open(ticks, "a").write(f"{name} end {time.time()}\\n")
    """
)


def stage(name: str, *deps: str) -> dict:
    spec = {
        "cmd": f"python step.py {name} {' '.join(deps)}".strip(),
        "deps": ["step.py", *[f"{d}.txt" for d in deps]],
        "outs": [f"{name}.txt"],
        "metrics": [{f"metrics/{name}.json": {"cache": False}}],
    }
    if name == "c":
        spec["deps"].append("c.cfg")
    return spec


def make_tiny_project(dest: Path) -> Path:
    """a -> b, a -> c, (b, c) -> d; params.yaml the micro params with MLflow off; committed."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "step.py").write_text(STEP)
    (dest / "c.cfg").write_text("ok\n")
    dvc_yaml = {"stages": {"a": stage("a"), "b": stage("b", "a"), "c": stage("c", "a"), "d": stage("d", "b", "c")}}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    params = micro_params()
    params["tracking"]["enabled"] = False
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (dest / ".gitignore").write_text("/mlflow.db\n/.prefect/\n")
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def ticks(path: Path) -> dict[str, tuple[float, float]]:
    """{stage: (start, end)} from a $TICKS file (the last run of each)."""
    seen: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, what, t = line.split()
        seen.setdefault(name, {})[what] = float(t)
    return {k: (v["start"], v.get("end", float("nan"))) for k, v in seen.items()}
