"""The examples in examples/, as a user would run them: tiny settings, HE, in a tmp dir."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from secagg.config import RunConfig
from secagg.task import RoundContext, Site, Task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' convention: examples/ on PYTHONPATH (for this process and its children)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    paths = [str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def one_round(task: Task, data_dir: Path, config: RunConfig, rounds: int = 1) -> tuple:
    """Site 1 of ``config.clients`` trains ``rounds`` rounds; (model, train results, eval)."""
    site = Site(0, "site-1", config.clients, data_dir, seed=config.seed)
    torch.manual_seed(config.seed)
    model = task.build_model()
    data = task.load_data(site)
    trained = []
    for r in range(1, rounds + 1):
        ctx = RoundContext(r, rounds, site, torch.device("cpu"), 100 + r, config)
        trained.append(task.train(model, data, ctx))
    return model, trained, task.evaluate(model, data, ctx)


def test_tabular_task_trains_and_reports_auc(tmp_path: Path) -> None:
    from tabular.prepare import write_csvs
    from tabular.task import BreastCancer

    write_csvs(tmp_path, sites=3)
    config = RunConfig(clients=3, local_epochs=2, batch_size=16, lr=0.01)
    _, trained, evaluated = one_round(BreastCancer(hidden=16), tmp_path, config, rounds=2)
    assert trained[-1].num_samples == 142  # 3/4 of 569 rows, dealt to 3 sites
    assert trained[-1].metrics["loss"] < trained[0].metrics["loss"]
    assert evaluated.metrics["auc"] > 0.8


def test_image_folder_task_streams_site_folder(tmp_path: Path) -> None:
    from image_folder.make_images import make_images
    from image_folder.task import Shapes

    make_images(tmp_path, sites=2, train_per_class=4, test_per_class=2)
    task = Shapes(classes=["circle", "square", "triangle"])
    config = RunConfig(clients=2, local_epochs=1, batch_size=8, lr=0.01)
    _, trained, evaluated = one_round(task, tmp_path, config)
    assert trained[0].num_samples == 4 * 2 + 4 + 4  # site 1 has twice the circles
    assert evaluated.num_samples == 6
    assert 0 <= evaluated.metrics["accuracy"] <= 1


def test_image_folder_fixes_class_numbers_when_a_site_lacks_one(tmp_path: Path) -> None:
    from image_folder.make_images import make_images
    from image_folder.task import Shapes

    make_images(tmp_path, sites=1, train_per_class=2, test_per_class=1)
    for split in ("train", "test"):
        for png in (tmp_path / "site-1" / split / "circle").iterdir():
            png.unlink()
    site = Site(0, "site-1", 1, tmp_path / "site-1")  # a real site: data_dir is its own folder
    data = Shapes().load_data(site)
    assert data["train"].class_to_idx == {"circle": 0, "square": 1, "triangle": 2}
    assert sorted(set(data["train"].targets)) == [1, 2]


def test_torchvision_model_task_trains_with_schedule_and_clipping() -> None:
    from torchvision_model.task import TorchvisionModel

    task = TorchvisionModel(train_limit=32, test_limit=16, max_grad_norm=1.0)
    config = RunConfig(clients=3, local_epochs=1, batch_size=16, lr=0.05)
    model, trained, evaluated = one_round(task, Path("unused"), config, rounds=2)
    assert [t.num_samples for t in trained] == [32, 32]
    assert trained[0].metrics["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert trained[1].metrics["lr"] == pytest.approx(0.0)
    assert math.isfinite(evaluated.loss)
    assert model.state_dict()["features.0.1.num_batches_tracked"].item() == 4


def test_from_a_script_task_trains_the_scripts_model() -> None:
    from from_a_script.task import Digits

    config = RunConfig(clients=3, local_epochs=1, lr=0.05)
    _, trained, evaluated = one_round(Digits(), Path("unused"), config)
    assert trained[0].num_samples == 467  # every third of the script's 1,400 training digits
    assert evaluated.metrics["accuracy"] > 0.5


def test_from_a_script_readme_diff_matches_the_files() -> None:
    """The README's diff: removed lines are train.py's, added lines task.py's, under 20 added."""
    folder = EXAMPLES / "from_a_script"
    readme = (folder / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", readme, re.S).group(1).splitlines()  # type: ignore[union-attr]
    removed = [line[1:] for line in diff if line.startswith("-")]
    added = [line[1:] for line in diff if line.startswith("+")]
    script, task = (folder / "train.py").read_text(), (folder / "task.py").read_text()
    assert "\n".join(removed) in script
    assert "\n".join(added) in task
    assert len([line for line in added if line.strip()]) < 20
