"""The documents stay short, free of commit references, linked to files that exist, and the README's
results table says what the committed metrics say."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipelines import readme_results

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]

# A commit reference: 7-40 hex digits with at least one digit and one letter, as a bare word or in backticks.
COMMIT = re.compile(r"(?<![\w/.#-])`?(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}`?(?![\w/.-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """The committed metrics/ and runs/ (git's HEAD), which the README's blocks are generated from: a `make repro`
    in this checkout rewrites the working tree's copies with its own run (other wall times, on another kind of
    machine other numbers) before `make test` reads them. The checkout itself where git has no HEAD."""
    proc = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "metrics", "runs"], capture_output=True)
    if proc.returncode != 0:
        return REPO
    root = tmp_path_factory.mktemp("committed")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(root, filter="data")
    return root


def test_readme_is_at_most_12000_bytes():
    assert README.stat().st_size <= 12_000, README.stat().st_size


def test_commit_pattern_finds_hashes_and_nothing_else():
    assert COMMIT.search("until `c486366` the tokens") and COMMIT.search("at commit f62dd78, the")
    assert COMMIT.search("a9f3b2c41e0d5f6a7b8c9d0e1f2a3b4c5d6e7f80 merged")
    for text in (
        "1,391 boxes",
        "decade 2026112",
        "abcdefab",
        "0.0001234",
        "rand-m9-mstd0.5-inc1",
        "dvc_plots/a1b2c3d4e",
    ):
        assert not COMMIT.search(text), text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_commit_references(doc):
    found = [m.group(0) for m in COMMIT.finditer(doc.read_text(encoding="utf-8"))]
    assert not found, f"{doc.name}: commit references {found}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{doc.name}: links to missing files {broken}"


def _table(block: str) -> dict[str, str]:
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    return {row.split("|")[1].strip().strip("`"): row for row in rows}


def test_readme_results_block_is_the_generators_output(committed):
    head, block, tail = readme_results.split_readme(README.read_text(encoding="utf-8"), README)
    machine, date = readme_results.provenance(block, README)
    assert block == readme_results.render(committed, machine, date), "run: python -m pipelines.readme_results"


def test_readme_results_numbers_equal_the_metrics_files(committed):
    """Independently of the generator's formatting code paths: the headline numbers of every metrics file
    appear, rounded as printed, in that stage's row."""
    _, block, _ = readme_results.split_readme(README.read_text(encoding="utf-8"), README)
    rows = _table(block)
    m = committed / "metrics"
    expected: dict[str, list[str]] = {}
    mae = json.loads((m / "pretrain_mae.json").read_text())
    expected["pretrain_mae"] = [f"{mae['val_masked_loss']:.3f}"]
    ibot = json.loads((m / "pretrain_ibot.json").read_text())
    expected["pretrain_ibot"] = [f"{ibot['knn_top1']:.1f} %", f"{ibot['teacher_kl']:.2f}"]
    for path in (m / "finetune").glob("*-0.json"):  # the table shows seed 0
        d = json.loads(path.read_text())
        expected[f"finetune@{path.stem}"] = [f"**{d['top1']:.1f} %**"] + [
            f"{d[k]:.1f}" for k in ("linear_probe_top1", "knn_top1") if k in d
        ]
    for path in (m / "detect").glob("*-0.json"):  # the table shows seed 0
        d = json.loads(path.read_text())
        expected[f"detect@{path.stem}"] = [f"**{d['AP']:.3f}**", f"{d['AP50']:.3f}", f"{d['student']['AP']:.3f}"]
    cka = json.loads((m / "cka.json").read_text())["summary"]["finetuned__cnn"]
    expected["cka"] = [f"{cka['lowest_layers']:.2f}", f"{cka['top_vit_best_cnn']:.2f}"]
    assert set(expected) <= set(rows), f"stages missing from the README table: {sorted(set(expected) - set(rows))}"
    for stage, numbers in expected.items():
        for number in numbers:
            assert number in rows[stage], f"README row {stage}: {number} not in {rows[stage]!r}"


def test_generator_rewrites_a_stale_block_and_check_catches_it(tmp_path, committed):
    project = tmp_path / "p"
    shutil.copytree(committed / "metrics", project / "metrics")
    if (committed / "runs").is_dir():  # the run info (timings) beside the numbers, pipelines/results.py
        shutil.copytree(committed / "runs", project / "runs")
    readme = project / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    mae = project / "metrics" / "pretrain_mae.json"
    d = json.loads(mae.read_text())
    d["val_masked_loss"] = 0.123456
    mae.write_text(json.dumps(d))
    args = ["--readme", str(readme), "--root", str(project)]
    assert readme_results.main([*args, "--check"]) == 1
    assert readme_results.main(args) == 0
    assert "held-out masked-patch loss 0.123 " in readme.read_text()
    assert readme_results.main([*args, "--check"]) == 0
    assert readme_results.main([*args, "--machine", "an H200", "--date", "2027-01-02"]) == 0
    assert "Measured on 2027-01-02, on an H200, by `make repro`" in readme.read_text()
    assert readme.read_text().endswith(README.read_text(encoding="utf-8").split(readme_results.END)[1])


def test_generator_names_a_missing_metrics_file(tmp_path, capsys):
    (tmp_path / "metrics").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    assert readme_results.main(["--readme", str(readme), "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prepare.json: metrics file not found" in err


def _claims_block(text: str) -> str:
    from pipelines.report import README_BEGIN, README_END

    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1, "README: one claims block expected"
    return text.split(README_BEGIN)[1].split(README_END)[0].strip("\n")


def test_readme_claims_block_is_the_committed_claims(committed):
    """The README's claims table is generated from the committed metrics/claims.json, never typed."""
    from pipelines.claims import readme_block

    claims = json.loads((committed / "metrics" / "claims.json").read_text())
    block = _claims_block(README.read_text(encoding="utf-8"))
    assert block == readme_block(claims), "run: python -m pipelines.report --readme"
    # independently of the generator's code path: one row per claim, in order, with its n and difference
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len(rows) == len(claims)
    for row, entry in zip(rows, claims.values(), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(entry["diff"], rel=5e-3, abs=5e-7) and int(cells[4]) == entry["n"]
        assert ("holds" in cells[1]) == (entry["verdict"] == 1) and ("reversed" in cells[1]) == (entry["verdict"] == -1)


def test_readme_claims_check_fails_when_readme_and_claims_disagree(tmp_path, capsys, committed):
    from pipelines.report import readme_main

    readme, claims = tmp_path / "README.md", tmp_path / "claims.json"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    d = json.loads((committed / "metrics" / "claims.json").read_text())
    args = ["--readme", str(readme), "--claims", str(claims)]
    claims.write_text(json.dumps(d))
    assert readme_main([*args, "--check"]) == 0
    first = next(iter(d))
    d[first].update(diff=4.321, ci_low=1.5, ci_high=7.25, n=3, verdict=1)  # another run's numbers
    claims.write_text(json.dumps(d))
    assert readme_main([*args, "--check"]) == 1 and "differs from" in capsys.readouterr().err
    assert readme_main(args) == 0 and readme_main([*args, "--check"]) == 0
    assert "| **holds** | +4.32 | [+1.5, +7.25] | 3 |" in _claims_block(readme.read_text(encoding="utf-8"))
    claims.write_text("[1, 2]")
    assert readme_main(args) == 1 and "not a claims file" in capsys.readouterr().err
