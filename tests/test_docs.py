"""The docs site: it builds strictly (no broken link, no missing page), its references come from
the code, and every code block the docs mark as runnable runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: a fenced block right after this comment is run by the suite, as written
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```(?:bash|sh)\n(.*?)```", re.S)


def test_the_docs_site_builds_strictly_with_its_references(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    home = (site / "index.html").read_text()
    assert "Quick start" in home and 'href="threat-model/' in home  # the README, linked
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--he-precision" in cli and "secagg provision" in cli  # from click itself
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "headline_higher" in api and "build_model" in api  # from the docstrings


def _runnable() -> list[tuple[str, str]]:
    blocks = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, block in enumerate(RUNNABLE.findall(page.read_text()), 1):
            blocks.append((f"{page.relative_to(ROOT)}#{number}", block))
    return blocks


def test_the_docs_mark_runnable_blocks() -> None:
    assert len(_runnable()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize(("where", "block"), _runnable(), ids=[w for w, _ in _runnable()])
def test_a_runnable_block_runs_as_written(where: str, block: str, tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, f"{where}:\n{block}\n{ran.stdout[-2000:]}{ran.stderr[-2000:]}"


def test_every_test_the_threat_model_names_exists() -> None:
    """Each row of the threat model names the tests that would fail were it false: every one
    of them must be a test of the suite (``file.py::test_name``, or a bare ``test_name`` of
    the file named before it in the cell)."""
    text = (ROOT / "docs" / "threat-model.md").read_text()
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        defined[path.name] = set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    missing = []
    for row in (line for line in text.splitlines() if line.startswith("| ")):
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py)(?:::)?)?(test_\w+)?`", cell):
            current = file or current
            if name and (current is None or name not in defined.get(current, set())):
                missing.append(f"{current}::{name}")
    assert not missing, missing
