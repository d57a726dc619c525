"""The examples in examples/, as a user runs them: each job file for 2 rounds with HE, on tiny
data written by the example's own prepare code into a tmp dir."""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import secagg
from secagg.config import load_job
from secagg.records import RunResult

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' convention: examples/ on PYTHONPATH (for this process and its children)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    paths = [str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def run_example(
    name: str, tmp_path: Path, keys: Path, settings: dict | None = None, **job
) -> RunResult:
    """The example's job.toml for 2 rounds, in ``tmp_path``, with ``job`` and ``settings``
    (task settings) overriding the file's."""
    config = load_job(EXAMPLES / name / "job.toml")
    config = replace(
        config,
        rounds=2,
        data_dir=str(tmp_path / "data"),
        keys_dir=str(keys),
        output_dir=str(tmp_path / "run"),
        tracking=False,
        device="cpu",
        task_settings={**config.task_settings, **(settings or {})},
        **job,
    )
    assert config.he
    result = secagg.run(config=config)
    assert len(result.rounds) == 2
    assert (result.output_dir / "results.json").is_file()
    assert (result.output_dir / "model.pt").is_file()
    return result


@pytest.mark.slow
def test_tabular(tmp_path: Path, session_keys: Path) -> None:
    from tabular.prepare import write_csvs

    write_csvs(tmp_path / "data", sites=3)
    result = run_example("tabular", tmp_path, session_keys)
    metrics = result.rounds[-1].metrics
    assert metrics["auc"] > 0.8 and metrics["macro_f1"] > 0.8
    assert "accuracy" not in metrics and result.config.headline == "auc"
    assert metrics["train_loss"] < result.rounds[0].metrics["train_loss"]


@pytest.mark.slow
def test_tabular_over_grpc(tmp_path: Path, session_keys: Path) -> None:
    """Each site process imports the task by the job's path (PYTHONPATH reaches it)."""
    from tabular.prepare import write_csvs

    write_csvs(tmp_path / "data", sites=2)
    result = run_example("tabular", tmp_path, session_keys, clients=2, transport="grpc")
    assert result.rounds[-1].metrics["auc"] > 0.8


@pytest.mark.slow
def test_image_folder(tmp_path: Path, session_keys: Path) -> None:
    from image_folder.make_images import make_images

    make_images(tmp_path / "data", sites=3, train_per_class=6, test_per_class=3)
    result = run_example("image_folder", tmp_path, session_keys, local_epochs=1)
    metrics = result.rounds[-1].metrics
    assert 0 <= metrics["accuracy"] <= 1
    assert math.isfinite(result.rounds[-1].loss)


def test_image_folder_keeps_class_numbers_when_a_site_lacks_one(tmp_path: Path) -> None:
    from image_folder.make_images import make_images
    from image_folder.task import Shapes

    make_images(tmp_path, sites=1, train_per_class=2, test_per_class=1)
    for split in ("train", "test"):
        for png in (tmp_path / "site-1" / split / "circle").iterdir():
            png.unlink()
    # A real site: data_dir is the site's own folder, not a folder of site folders.
    site = secagg.Site(0, "site-1", 1, tmp_path / "site-1", partition=False)
    data = Shapes().load_data(site)
    assert data["train"].class_to_idx == {"circle": 0, "square": 1, "triangle": 2}
    assert sorted(set(data["train"].targets)) == [1, 2]


@pytest.mark.slow
def test_torchvision_model(tmp_path: Path, session_keys: Path) -> None:
    settings = {"train_limit": 32, "test_limit": 16}
    result = run_example(
        "torchvision_model",
        tmp_path,
        session_keys,
        settings,
        clients=2,
        local_epochs=1,
        batch_size=16,
    )
    metrics = result.rounds[-1].metrics
    assert 0 <= metrics["accuracy"] <= 1
    assert metrics["train_lr"] == pytest.approx(0.0)  # the cosine schedule's end
    assert metrics["train_grad_norm"] > 0
    # BatchNorm buffers are averaged too: 2 rounds of 1 epoch of 2 steps on each site.
    model = torch.load(result.output_dir / "model.pt")
    assert model["features.0.1.num_batches_tracked"].item() == 4
    assert not torch.equal(model["features.0.1.running_var"], torch.ones(16))


@pytest.mark.slow
def test_from_a_script(tmp_path: Path, session_keys: Path) -> None:
    result = run_example("from_a_script", tmp_path, session_keys)
    assert result.rounds[-1].metrics["accuracy"] > 0.5


def test_from_a_script_readme_diff_matches_the_files() -> None:
    """The README's diff: removed lines are train.py's, added lines task.py's, under 20 added."""
    folder = EXAMPLES / "from_a_script"
    diff = re.search(r"```diff\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert diff is not None
    lines = diff.group(1).splitlines()
    removed = "\n".join(line[1:] for line in lines if line.startswith("-"))
    added = [line[1:] for line in lines if line.startswith("+")]
    assert removed in (folder / "train.py").read_text()
    assert "\n".join(added) in (folder / "task.py").read_text()
    assert len([line for line in added if line.strip()]) < 20
