"""A user's own task: a package outside the repository, named by import path, run with HE in
one process, over gRPC, and from Python; its metrics reach results.json, MLflow and the console;
every mistake in it gets a one-line answer naming the site and what to fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import secagg
from secagg.config import RunConfig, load_job
from secagg.errors import ConfigError, TaskError
from secagg.job import run_job

#: A user's task package: tabular data made per site from its seed, a small MLP with a
#: BatchNorm layer (int64 num_batches_tracked) and a frozen parameter, its own metric.
TASK_PACKAGE = '''
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import secagg

HELD = {"now": 0, "most": 0}


class Rows(Dataset):
    """Rows made on demand, never all in memory: counts how many are alive at once."""

    def __init__(self, n: int, seed: int, features: int) -> None:
        self.n, self.seed, self.features = n, seed, features

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng(self.seed * 100_003 + i)
        x = rng.normal(0, 1, self.features).astype(np.float32)
        y = int(x[0] + 0.5 * x[1] > 0)
        return Row(x), y


class Row:
    def __init__(self, x) -> None:
        self.x = x
        HELD["now"] += 1
        HELD["most"] = max(HELD["most"], HELD["now"])

    def __del__(self) -> None:
        HELD["now"] -= 1


def collate(batch):
    x = torch.tensor(np.stack([row.x for row, _ in batch]))
    y = torch.tensor([label for _, label in batch])
    return x, y


class Tabular(secagg.Task):
    def __init__(self, features: int = 6, rows: int = 64, hidden: int = 16, fail: str = "",
                 epochs: int = 2) -> None:
        self.features, self.rows, self.hidden, self.fail, self.epochs = (
            features, rows, hidden, fail, epochs)

    def build_model(self) -> nn.Module:
        model = nn.Sequential(
            nn.Linear(self.features, self.hidden), nn.BatchNorm1d(self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, 2),
        )
        model.register_parameter("frozen", nn.Parameter(torch.ones(3), requires_grad=False))
        return model

    def load_data(self, site: secagg.Site):
        train = Rows(self.rows + 8 * site.index, 1 + site.index, self.features)
        test = Rows(50, 999, self.features)
        return {
            "train": lambda g: DataLoader(train, batch_size=16, shuffle=True, generator=g,
                                          collate_fn=collate),
            "test": DataLoader(test, batch_size=25, collate_fn=collate),
            "n": len(train),
        }

    def train(self, model, data, ctx):
        if self.fail == "train" and ctx.site.index == 1:
            raise ValueError("boom in the user's loop")
        if self.fail == "zero":
            return secagg.TrainResult(0)
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.1
        )
        total = 0.0
        for _ in range(self.epochs):
            for x, y in data["train"](ctx.generator()):
                x, y = x.to(ctx.device), y.to(ctx.device)
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item()
        if self.fail == "nan" and ctx.site.index == 2:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        return secagg.TrainResult(data["n"], {"loss": total})

    def evaluate(self, model, data, ctx):
        correct, n, loss = 0, 0, 0.0
        with torch.no_grad():
            for x, y in data["test"]:
                logits = model(x.to(ctx.device))
                loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += len(y)
        return secagg.EvalResult(loss / n, n, {"score": correct / n, "rounds_seen": ctx.round})
'''


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``mytasks`` in a folder outside the repository, on sys.path and PYTHONPATH."""
    root = tmp_path / "elsewhere"
    (root / "mytasks").mkdir(parents=True)
    (root / "mytasks" / "__init__.py").write_text(TASK_PACKAGE)
    monkeypatch.syspath_prepend(str(root))
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    yield root
    for name in [m for m in sys.modules if m == "mytasks" or m.startswith("mytasks.")]:
        del sys.modules[name]


def _config(tmp_path: Path, keys: Path, **changes) -> RunConfig:  # type: ignore[no-untyped-def]
    base = RunConfig(
        task="mytasks:Tabular",
        clients=3,
        rounds=2,
        keys_dir=str(keys),
        tracking=False,
        output_dir=str(tmp_path / "run"),
        job_name="tabular",
    )
    return replace(base, **changes)


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt")


@pytest.mark.slow
def test_a_task_from_another_package_runs_with_he_and_matches_plaintext(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    he = run_job(_config(tmp_path / "he", session_keys, he=True))
    plain = run_job(_config(tmp_path / "plain", session_keys, he=False))
    # The task's own metric, averaged over the clients that evaluated, every round.
    assert [m.metrics["rounds_seen"] for m in he.rounds] == [1.0, 2.0]
    assert he.rounds[-1].metrics["score"] > 0.7
    assert "train_loss" in he.rounds[0].metrics
    assert "accuracy" not in he.rounds[0].metrics  # none reported, none made up
    # HE's final model equals plaintext FedAvg's within the codec's stated precision: each
    # summed value is off by at most c/2 steps, about 1e-3 of a block's largest change here.
    he_model, plain_model = _model(Path(he.output_dir)), _model(Path(plain.output_dir))
    assert he_model.keys() == plain_model.keys()
    for name, value in plain_model.items():
        if value.is_floating_point():
            assert torch.allclose(he_model[name], value, atol=2e-3), name
        else:
            assert torch.equal(he_model[name], value), name  # num_batches_tracked, int64
    assert he_model["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(he_model["frozen"], torch.ones(3))  # frozen: sent, never changed
    results = json.loads((Path(he.output_dir) / "results.json").read_text())
    assert results["rounds"][-1]["metrics"]["score"] == he.rounds[-1].metrics["score"]


def test_datasets_are_streamed_not_preloaded(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    """3 clients of 64-80 rows each, two epochs, two rounds: at most a few batches of rows
    are ever alive at once."""
    import mytasks

    run_job(_config(tmp_path, session_keys, he=False))
    assert 0 < mytasks.HELD["most"] <= 3 * 16


def test_python_api_runs_a_task_object(tmp_path: Path, session_keys: Path, user_package) -> None:
    import mytasks

    config = _config(tmp_path, session_keys, task=None, rounds=1)
    result = secagg.run(mytasks.Tabular(hidden=8), config)
    assert result.rounds[0].metrics["rounds_seen"] == 1.0
    assert (Path(result.output_dir) / "model.pt").exists()
    # Labelled as itself: its class, and its own metrics (no built-in accuracy)
    assert result.config.task == "mytasks:Tabular" and result.config.headline == "loss"
    with pytest.raises(ConfigError, match="import path"):
        secagg.run(mytasks.Tabular(), replace(config, transport="grpc"))


def test_job_file_names_the_task_and_its_settings(tmp_path: Path, user_package: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('task = "mytasks:Tabular"\nrounds = 1\n\n[task_settings]\nhidden = 8\n')
    config = load_job(job)
    assert config.task == "mytasks:Tabular" and config.task_settings == {"hidden": 8}
    job.write_text("[task]\nhidden = 8\n")
    with pytest.raises(ConfigError, match=r"\[task_settings\] table"):
        load_job(job)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("mytasks", "task must be an import path like 'package.module:TaskClass'"),
        ("nosuchpkg.tasks:Thing", "no module named 'nosuchpkg'; install its package or add"),
        ("mytasks:Nope", "module mytasks has no 'Nope'"),
        ("mytasks:HELD", "is not a Task subclass"),
    ],
)
def test_an_import_path_that_does_not_resolve_says_which_part(
    tmp_path: Path, session_keys: Path, user_package: Path, path: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_job(_config(tmp_path, session_keys, task=path))
    assert not (tmp_path / "run").exists()  # nothing written for a job that cannot start


def test_unknown_task_settings_are_refused_with_the_signature(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    with pytest.raises(ConfigError, match=r"does not take these task_settings.*hiddn"):
        run_job(_config(tmp_path, session_keys, task_settings={"hiddn": 3}))


def test_task_settings_are_checked_against_the_constructors_annotations(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    """A setting of the wrong type is one line naming it, before any of the task's code (a
    string where an int belongs used to reach torch)."""
    for settings, expected in (
        ({"hidden": "8"}, "task_settings.hidden must be int, not '8' (str)"),
        ({"hidden": 8.5}, "task_settings.hidden must be int, not 8.5 (float)"),
        ({"fail": 3}, "task_settings.fail must be str, not 3 (int)"),
        ({"epochs": True}, "task_settings.epochs must be int, not True (bool)"),
    ):
        with pytest.raises(ConfigError) as raised:
            run_job(_config(tmp_path, session_keys, task_settings=settings))
        assert str(raised.value) == (
            f"task 'mytasks:Tabular': {expected}, as the task's constructor declares"
        )
    assert not (tmp_path / "run").exists()

    from secagg.task import make_task

    def factory(
        sizes: list[int], name: str | None = None, mode: typing.Literal["a", "b"] = "a", free=None
    ) -> secagg.Task:
        return secagg.Task()

    make_task(factory, {"sizes": [1, 2], "name": None, "mode": "b", "free": {"x": 1}}, "f")
    for bad, shown in (
        ({"sizes": [1, "2"]}, "sizes must be list[int]"),
        ({"sizes": [1], "name": 3}, "name must be str | None"),
        ({"sizes": [1], "mode": "c"}, "mode must be Literal['a', 'b']"),
    ):
        with pytest.raises(ConfigError, match=re.escape(shown)):
            make_task(factory, bad, "f")


def test_a_train_that_raises_names_the_site_and_keeps_the_checkpoint(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    config = _config(tmp_path, session_keys, he=True, task_settings={"fail": "train"})
    with pytest.raises(TaskError) as raised:
        run_job(config)
    assert str(raised.value) == (
        "site-2: the task's train raised ValueError: boom in the user's loop"
    )
    assert not (tmp_path / "run" / "state.json").exists()  # no round finished: none claimed


def test_the_cli_prints_one_line_and_the_traceback_with_debug(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'task = "mytasks:Tabular"\nclients = 3\nrounds = 1\n\n[task_settings]\nfail = "train"\n'
    )
    base = [sys.executable, "-m", "secagg.cli"]
    args = ["run", str(job), "--keys", str(session_keys), "--no-tracking", "--output", "o"]
    plain = subprocess.run(base + args, cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [
        "Error: site-2: the task's train raised ValueError: boom in the user's loop"
    ]
    debug = subprocess.run([*base, "--debug", *args], cwd=tmp_path, capture_output=True, text=True)
    assert "Traceback" in debug.stderr and 'raise ValueError("boom' in debug.stderr


def test_a_failed_run_is_failed_in_mlflow_with_its_reason_and_the_tasks_labels(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    """A user's task is labelled as itself (no built-in dataset or model), and a run that
    fails is FAILED with the reason, in its tags and its description."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"fail": "train", "hidden": 8}
    config = _config(tmp_path, session_keys, tracking=True, tracking_uri=uri)
    with pytest.raises(TaskError):
        run_job(replace(config, task_settings=settings, metric="score"))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secagg").experiment_id])
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["failure"] == "site-2: the task's train raised ValueError: boom in the user's loop"
    assert tags["task"] == "mytasks:Tabular" and tags["metric"] == "score"
    assert "dataset" not in tags and "model" not in tags
    text = tags["mlflow.note.content"]
    assert "task: `mytasks:Tabular`" in text and "task settings: fail='train', hidden=8" in text
    assert "metric: score (higher is better)" in text and "**failed**: site-2:" in text
    assert "mlp" not in text and "digits" not in text


def test_a_jobs_metric_the_task_never_reports_is_named_in_a_warning(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    config = _config(tmp_path, session_keys, rounds=1, metric="macro_f1")
    with pytest.warns(UserWarning, match="'macro_f1' is not one its task reports .*rounds_seen"):
        result = run_job(config)
    text = (tmp_path / "run" / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert results["metric"] == {"name": "macro_f1", "higher_is_better": True, "final": None}
    assert result.final != result.final  # NaN in Python, null on disk


def test_a_train_reporting_no_samples_is_refused(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    with pytest.raises(TaskError, match="site-1: the task's train reported 0 samples"):
        run_job(_config(tmp_path, session_keys, task_settings={"fail": "zero"}))


def test_an_update_holding_nan_is_refused_before_encryption(
    tmp_path: Path, session_keys: Path, user_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from secagg.crypto.quantized import QuantizedCipher

    encrypted: list[int] = []
    real = QuantizedCipher.encrypt

    def spy(self, update, stamp, agreed):  # type: ignore[no-untyped-def]
        encrypted.append(stamp.sender)
        return real(self, update, stamp, agreed)

    monkeypatch.setattr(QuantizedCipher, "encrypt", spy)
    config = _config(tmp_path, session_keys, he=True, task_settings={"fail": "nan"})
    with pytest.raises(
        TaskError, match=r"site-3: .*NaN or infinite values \(first in '0.weight'\)"
    ):
        run_job(config)
    assert encrypted == []  # refused in training, before any client's update was encrypted


def test_a_model_that_is_not_the_jobs_is_refused_with_the_first_difference(
    tmp_path: Path, session_keys: Path, user_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mytasks

    original = mytasks.Tabular.build_model
    built = {"count": 0}

    def second_is_wider(self):  # type: ignore[no-untyped-def]
        built["count"] += 1
        if built["count"] == 2:
            self.hidden = 32
        return original(self)

    monkeypatch.setattr(mytasks.Tabular, "build_model", second_is_wider)
    with pytest.raises(ConfigError) as raised:
        run_job(_config(tmp_path, session_keys))
    assert str(raised.value) == (
        "site-2's model is not the job's: '0.weight' has shape [32, 6], the job's model has [16, 6]"
    )


def test_a_model_with_other_initial_weights_is_refused(
    tmp_path: Path, session_keys: Path, user_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mytasks

    original = mytasks.Tabular.build_model

    def unseeded(self):  # type: ignore[no-untyped-def]
        torch.manual_seed(int.from_bytes(os.urandom(4), "big"))
        return original(self)

    monkeypatch.setattr(mytasks.Tabular, "build_model", unseeded)
    with pytest.raises(ConfigError, match="initial weights differ"):
        run_job(_config(tmp_path, session_keys))


def test_an_initial_model_file_is_where_every_client_starts(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    import mytasks

    model = mytasks.Tabular().build_model()
    for parameter in model.parameters():
        torch.nn.init.constant_(parameter, 0.25)
    start = tmp_path / "start.pt"
    torch.save(model.state_dict(), start)
    config = _config(tmp_path, session_keys, initial_model=str(start), rounds=1)
    from secagg.builtin import task_for
    from secagg.job import build_clients

    clients = build_clients(config, task_for(config))
    assert all(torch.equal(c.model[0].weight, torch.full((16, 6), 0.25)) for c in clients)
    with pytest.raises(ConfigError, match=r"initial_model .* not found"):
        build_clients(replace(config, initial_model=str(tmp_path / "none.pt")), task_for(config))


@pytest.mark.slow
def test_a_task_by_import_path_runs_over_grpc_like_in_process(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(
            """\
            task = "mytasks:Tabular"
            clients = 2
            rounds = 2
            he = true
            metric = "score"
            torch_threads = 2

            [task_settings]
            hidden = 8
            """
        )
    )
    base = [sys.executable, "-m", "secagg.cli", "run", str(job), "--keys", str(session_keys)]
    grpc = subprocess.run(
        [*base, "--no-tracking", "--output", "g", "--transport", "grpc"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert grpc.returncode == 0, grpc.stdout + grpc.stderr
    local = subprocess.run(
        [*base, "--no-tracking", "--output", "l"], cwd=tmp_path, capture_output=True, text=True
    )
    assert local.returncode == 0, local.stderr
    assert "score" in local.stdout  # the task's metric on the console line
    for run in (grpc, local):  # the job's metric leads; nothing is called accuracy, or nan
        assert "done: final score 0." in run.stdout, run.stdout
        assert "accuracy" not in run.stdout + run.stderr and "nan" not in run.stdout.lower()
    for folder in ("g", "l"):  # strict JSON: a metric no site reported would be null
        text = (tmp_path / folder / "results.json").read_text()
        results = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
        assert results["metric"]["name"] == "score" and results["metric"]["higher_is_better"]
        assert results["metric"]["final"] == results["rounds"][-1]["metrics"]["score"]
    # The same rounds and sums, and the job's torch threads in every site process and in
    # process: the same model, bit for bit (BatchNorm's statistics included).
    for name, value in _model(tmp_path / "l").items():
        assert torch.equal(_model(tmp_path / "g")[name], value), name
    rounds = json.loads((tmp_path / "g" / "results.json").read_text())["rounds"]
    assert rounds[-1]["metrics"]["rounds_seen"] == 2.0


@pytest.mark.slow
def test_compare_he_shows_the_tasks_own_metric(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import compare_he

    job = tmp_path / "job.toml"
    job.write_text('task = "mytasks:Tabular"\nclients = 3\nrounds = 1\n')
    args = ["--job", str(job), "--keys", str(session_keys), "--out", str(tmp_path / "out")]
    flags = ["--no-tracking", "--no-memory", "--no-floor", "--repeats", "1"]
    report = compare_he.main(args + flags)
    row = report["rounds"][0]
    assert row["plain_metrics"]["score"] == pytest.approx(row["he_metrics"]["score"], abs=0.05)
    markdown = Path(report["files"]["md"]).read_text()
    assert "| round | score plaintext | score HE | rounds_seen plaintext" in markdown


@pytest.mark.slow
def test_a_site_whose_train_raises_stops_a_grpc_run_with_its_reason(
    tmp_path: Path, session_keys: Path, user_package: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'task = "mytasks:Tabular"\nclients = 2\nrounds = 2\n\n[task_settings]\nfail = "train"\n'
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "secagg.cli",
            "run",
            str(job),
            "--transport",
            "grpc",
            "--keys",
            str(session_keys),
            "--no-tracking",
            "--output",
            "g",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # not the round timeout: the server stops as soon as it knows
    )
    assert run.returncode == 1
    assert "site-2 failed: site-2: the task's train raised ValueError: boom" in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the server process failed: Error: round 1:")
    assert "boom in the user's loop" in last


@pytest.mark.slow
def test_a_grpc_run_whose_sites_lack_their_dataset_fails_fast_with_their_reason(
    tmp_path: Path, session_keys: Path
) -> None:
    (tmp_path / "empty").mkdir()
    args = ["run", "--transport", "grpc", "--dataset", "mnist", "--data-dir", "empty"]
    args += ["--clients", "2", "--rounds", "1", "--no-tracking", "--output", "g"]
    run = subprocess.run(
        [sys.executable, "-m", "secagg.cli", *args, "--keys", str(session_keys)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # the round timeout is 900 s: the server stops as soon as it knows why
    )
    assert run.returncode == 1
    assert "connected" in run.stdout  # the server says who came
    # The server prints a failed site's own reason by name, and stops on it.
    assert re.search(r"site-\d failed: mnist not found in empty/", run.stdout)
    assert "mnist not found in empty/" in run.stderr.strip().splitlines()[-1]
