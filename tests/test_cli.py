"""The secagg command as a user runs it: real processes for the happy path, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from secagg.cli import main

SECAGG = [sys.executable, "-m", "secagg.cli"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        SECAGG + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_keygen_then_he_run_logs_results_and_mlflow(tmp_path: Path) -> None:
    keygen = _run(["keygen", "--out", "keys"], tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    assert "fingerprint" in keygen.stdout
    uri = f"sqlite:///{tmp_path / 'track.db'}"
    run = _run(
        [
            "run",
            "--he",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--output",
            "out",
            "--tracking-uri",
            uri,
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "round   1/2" in run.stdout and "round   2/2" in run.stdout
    assert "final accuracy" in run.stdout

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["he"] is True
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["encrypt_seconds"] > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = results["mlflow"]["run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["he"] == "true"
    assert mlflow_run.data.params["clients"] == "3"
    for metric in ("accuracy", "loss", "round_seconds", "encrypt_seconds", "bytes_up"):
        history = client.get_metric_history(run_id, metric)
        assert sorted(m.step for m in history) == [1, 2], metric
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "results.json"} <= artifacts
    # The closing lines: one duration, the run's page in the UI, and how to start the UI.
    assert f"in {results['seconds']:.1f}s" in run.stdout
    experiment = mlflow_run.info.experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in run.stdout
    assert f"start the UI first: mlflow ui --backend-store-uri {uri}" in run.stdout


def test_run_summary_prints_the_mlflow_ui_url(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'track.db'}"
    args = ["run", "--clients", "2", "--rounds", "1", "--output", "o", "--tracking-uri", uri]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    run = MlflowClient(tracking_uri=uri).get_run(saved["mlflow"]["run_id"])
    lines = result.output.splitlines()
    assert lines[-5].startswith("done: final accuracy") and lines[-5].endswith(
        f"in {saved['seconds']:.1f}s (9,610 parameters)"
    )
    url = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert lines[-2] == f"  MLflow:  {run.info.run_name}  {url}"
    assert lines[-1] == f"  start the UI first: mlflow ui --backend-store-uri {uri}"


def _invoke(args: list[str], cwd: Path):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, args)
    finally:
        os.chdir(old)


def _assert_one_line_error(result, *fragments: str, code: int = 1) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--clients", "0"], "--clients"),
        (["run", "--lr", "-1"], "--lr"),
        (["run", "--dataset", "imagenet"], "--dataset"),
        (["run", "--rounds", "x"], "--rounds"),
        (["keygen", "--poly-degree", "1000"], "--poly-degree"),
        (["run", "--he-precision", "double"], "--he-precision"),
        (["run", "--he", "--dp-epsilon", "0"], "--dp-epsilon"),  # no epsilon means no DP
    ],
)
def test_invalid_flag_values_are_usage_errors(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    _assert_one_line_error(_invoke(args, tmp_path), fragment, code=2)


def test_keygen_over_existing_keys_is_refused_and_keys_kept(tmp_path: Path, keys_dir: Path) -> None:
    before = (keys_dir / "client.ctx").read_bytes()
    result = _invoke(["keygen", "--out", str(keys_dir)], tmp_path)
    _assert_one_line_error(result, "already holds keys", "--force")
    assert (keys_dir / "client.ctx").read_bytes() == before


def test_keygen_refuses_weak_parameters(tmp_path: Path) -> None:
    result = _invoke(
        ["keygen", "--out", "k", "--poly-degree", "4096", "--coeff-bits", "60,60"], tmp_path
    )
    _assert_one_line_error(result, "128-bit security", "limit 109 bits")
    assert not (tmp_path / "k" / "client.ctx").exists()


def test_he_run_without_keys_says_to_run_keygen(tmp_path: Path) -> None:
    result = _invoke(["run", "--he", "--keys", "nokeys", "--no-tracking"], tmp_path)
    _assert_one_line_error(result, "secagg keygen")


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    result = _invoke(
        ["run", "--dataset", "mnist", "--model", "cnn", "--data-dir", "empty", "--no-tracking"],
        tmp_path,
    )
    _assert_one_line_error(result, "mnist not found", "--download")


def test_job_file_with_unknown_key_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "bad.toml"
    job.write_text('dataset = "digits"\nclinets = 4\n')
    _assert_one_line_error(_invoke(["run", str(job), "--no-tracking"], tmp_path), "clinets")


def test_model_that_does_not_fit_the_dataset_is_refused(tmp_path: Path) -> None:
    result = _invoke(["run", "--model", "moderate-cnn", "--no-tracking"], tmp_path)
    _assert_one_line_error(result, "moderate-cnn needs 3x32x32", "digits32")


def test_resume_with_nothing_to_resume(tmp_path: Path) -> None:
    result = _invoke(["run", "--resume", "--output", "nothing", "--no-tracking"], tmp_path)
    _assert_one_line_error(result, "no checkpoint to resume")


def test_job_file_values_are_overridden_by_flags(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("rounds = 5\nclients = 2\nlocal-epochs = 1\n")
    result = _invoke(["run", str(job), "--rounds", "1", "--output", "o", "--no-tracking"], tmp_path)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["rounds"] == 1 and results["config"]["clients"] == 2
    assert results["config"]["local_epochs"] == 1


@pytest.mark.slow
def test_he_precision_is_a_flag_and_a_job_setting(tmp_path: Path, keys_dir: Path) -> None:
    """--he-precision reaches the run (and its results.json); a bad job-file value is one line
    naming the choices."""
    for precision in ("standard", "fine"):
        args = ["run", "--he", "--he-precision", precision, "--clients", "2", "--rounds", "1"]
        args += ["--keys", str(keys_dir), "--output", precision, "--no-tracking"]
        result = _invoke(args, tmp_path)
        assert result.exit_code == 0, result.output
        results = json.loads((tmp_path / precision / "results.json").read_text())
        assert results["config"]["he_precision"] == precision
    job = tmp_path / "job.toml"
    job.write_text('he_precision = "double"\n')
    _assert_one_line_error(
        _invoke(["run", str(job), "--no-tracking"], tmp_path),
        "he_precision must be one of auto, standard, fine",
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('clients = "four"', 'clients must be an integer, not "four" (a string)'),
        ("rounds = 2.5", "rounds must be an integer, not 2.5 (a float)"),
        ('he = "no"', 'he must be true or false, not "no" (a string)'),
        ("download = 1", "download must be true or false, not 1 (an integer)"),
        ("task = 3", "task must be a string, not 3 (an integer)"),
        ("task_settings = 5", "task_settings must be a table, not 5 (an integer)"),
        ('lr = "fast"', 'lr must be a number, not "fast" (a string)'),
    ],
)
@pytest.mark.parametrize("transport", ["inprocess", "grpc"])
def test_job_file_with_a_wrong_type_is_one_line_and_leaves_no_run_folder(
    tmp_path: Path, line: str, message: str, transport: str
) -> None:
    job = tmp_path / "bad.toml"
    job.write_text(line + "\n")
    args = ["run", str(job), "--transport", transport, "--output", "o", "--no-tracking"]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: job file {job}: {message}\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_job_file_float_settings_accept_integers(tmp_path: Path) -> None:
    from secagg.config import load_job

    job = tmp_path / "job.toml"
    job.write_text("lr = 1\nalpha = 2\n")
    config = load_job(job).validate()
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.alpha == 2.0


def test_the_job_names_its_headline_metric_and_which_way_is_better(tmp_path: Path) -> None:
    from secagg.config import RunConfig, load_job

    assert (RunConfig().headline, RunConfig().headline_higher) == ("accuracy", True)
    task = RunConfig(task="pkg.mod:Task")  # a task of your own names its metrics itself
    assert (task.headline, task.headline_higher) == ("loss", False)
    for name, higher in (("macro_f1", True), ("val_mse", False), ("word_error_rate", False)):
        assert RunConfig(metric=name).headline_higher is higher, name
    job = tmp_path / "job.toml"
    job.write_text('metric = "perplexity_gap"\nhigher_is_better = true\n')
    config = load_job(job).validate()
    assert (config.headline, config.headline_higher) == ("perplexity_gap", True)
    job.write_text('higher_is_better = "yes"\n')
    with pytest.raises(Exception, match="higher_is_better must be true or false"):
        load_job(job)


def test_keygen_refuses_existing_keys_before_saying_it_generates(
    tmp_path: Path, keys_dir: Path
) -> None:
    result = _invoke(["keygen", "--out", str(keys_dir)], tmp_path)
    assert result.exit_code == 1
    assert "generating" not in result.output
    assert result.output.startswith(f"Error: {keys_dir}/ already holds keys")


def test_resume_applies_rounds_says_so_and_refuses_changes_to_the_job(tmp_path: Path) -> None:
    base = ["run", "--clients", "2", "--local-epochs", "1", "--output", "o", "--no-tracking"]
    first = _invoke([*base, "--rounds", "2"], tmp_path)
    assert first.exit_code == 0, first.output

    finished = _invoke(["run", "--resume", "--output", "o", "--no-tracking"], tmp_path)
    assert finished.exit_code == 0, finished.output
    assert finished.output.startswith("o is finished: all 2 rounds ran (final accuracy 0.")
    assert "To train on, resume with --rounds above 2." in finished.output
    assert "done" not in finished.output and "round " not in finished.output

    changed = _invoke(
        ["run", "--resume", "--output", "o", "--lr", "0.1", "--no-tracking"], tmp_path
    )
    _assert_one_line_error(
        changed, "--resume continues o as it started; --lr 0.1 (the run has 0.05) would make it"
    )
    shorter = _invoke(["run", "--resume", "--output", "o", "--rounds", "1"], tmp_path)
    _assert_one_line_error(shorter, "o has already completed 2 rounds; --rounds must be at least 2")

    longer = _invoke(
        ["run", "--resume", "--output", "o", "--rounds", "3", "--no-tracking"], tmp_path
    )
    assert longer.exit_code == 0, longer.output
    lines = longer.output.splitlines()
    assert lines[0] == "resuming o: 2 of 3 rounds done; rounds 2 -> 3"
    assert lines[1].startswith("round   3/3")
    assert "after 3 rounds" in longer.output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["rounds"] == 3 and len(results["rounds"]) == 3


def test_ctrl_c_prints_the_command_that_resumes_the_run(tmp_path: Path) -> None:
    import signal

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    args = ["run", "--clients", "2", "--local-epochs", "1", "--rounds", "500"]
    proc = subprocess.Popen(
        [*SECAGG, *args, "--output", "my run", "--no-tracking"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As at a terminal: a test suite started in the background (``make test &``) runs with
        # SIGINT ignored, which a child would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round   1/500"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "interrupted; to continue, run: secagg run --resume --output 'my run'"
    )
    done = json.loads((tmp_path / "my run" / "state.json").read_text())["round"]
    resumed = _invoke(
        ["run", "--resume", "--output", "my run", "--rounds", str(done + 1), "--no-tracking"],
        tmp_path,
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"round {done + 1:>3}/{done + 1}" in resumed.output


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run secagg with stdout and stderr on a pseudo-terminal (120 columns); return its exit
    code and everything it wrote."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        SECAGG + args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode()


RUN_2x2 = ["run", "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--no-tracking"]


def test_progress_bar_on_a_terminal_shows_set_up_phases_and_eta(tmp_path: Path) -> None:
    code, out = _on_a_terminal([*RUN_2x2, "--output", "o"], tmp_path)
    assert code == 0, out
    for shown in (
        "loading data and building clients 2/2",
        "round 1/2: train 1/2",
        "round 1/2: encrypt 2/2",
        "round 1/2: aggregate 2/2",
        "round 2/2: apply 1/2",
        "round 2/2: evaluate 2/2",
        "1/2 rounds [",
        "ETA",
    ):
        assert shown in out, shown
    # the round lines are still there, whole, above the bar
    assert "\nround   1/2  acc " in out.replace("\r", "\n")


def test_no_progress_bar_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    run = _run([*RUN_2x2, "--output", "o"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout + run.stderr and "ETA" not in run.stdout + run.stderr
    assert "loading data" not in run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("secagg run: digits/mlp, 2 clients, 2 rounds")
    assert lines[1].startswith("round   1/2  acc ") and lines[2].startswith("round   2/2  acc ")
    assert lines[3].startswith("done: final accuracy")


def test_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    result = _invoke([*RUN_2x2, "--output", "o", "--quiet"], tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("done: final accuracy") and "after 2 rounds" in lines[0]
    assert lines[1:] == ["  results: o/results.json", "  model:   o/model.pt"]


def test_run_help_shows_defaults_units_the_he_limit_and_an_example(tmp_path: Path) -> None:
    from secagg.crypto.packing import WIDE

    result = _invoke(["run", "--help"], tmp_path)
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps lines where it likes
    for shown in (
        "Clients in the job: the population (with --he at most 1024 per round). [default: 8]",
        "Clients drawn to take part in each round",
        "Federated rounds. [default: 10]",
        "Learning rate. [default: 0.05]",
        "[default: off]",
        "seconds each phase of a round waits for the sites. [default: 900.0]",
        "MB sent up and down",
        f"With --he, at most {WIDE.max_clients} clients take part in a round",
        "secagg run --resume --output runs/<run> --rounds 20",
        "-q, --quiet",
    ):
        assert shown in text, shown


@pytest.mark.parametrize(
    "command", ["keygen", "run", "provision", "server", "client", "status", "abort"]
)
def test_every_command_help_has_an_example(tmp_path: Path, command: str) -> None:
    result = _invoke([command, "--help"], tmp_path)
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"  secagg {command}" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--he", "--dp-clip", "0.5"], "--dp-clip set differential privacy"),
        (["--he", "--no-masking", "--dp-epsilon", "3"], "needs the pairwise masks"),
        (["--he", "--dp-noise", "inf"], "dp_noise must be"),
        (["--he", "--dp-noise", "0.5", "--dp-epsilon", "0.01"], "does not cover one round"),
    ],
)
def test_dp_settings_that_would_mislead_are_refused_before_anything_runs(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    result = _invoke(["run", "--clients", "3", "--rounds", "1", "--no-tracking", *args], tmp_path)
    _assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_a_round_line_leads_with_the_headline_and_shows_dps_epsilon_and_clip() -> None:
    from secagg.cli.console import _progress
    from secagg.rounds import RoundMetrics

    metrics = RoundMetrics(
        *(1, 3, 0.5, 0.6, 1.0, 0, 0, 0, 0, 0, 0, 0, 1000, 1000, 0, 0, 0),
        metrics={"accuracy": 0.9, "train_dp_clip": 0.25},
        epsilon=2.5,
    )
    lines: list[str] = []
    _progress(3, True, lines.append, "loss")(metrics)
    _progress(3, True, lines.append, "accuracy")(metrics)
    assert lines[0].startswith("round   1/3  loss 0.5000  acc 0.9000  eps 2.50  clip 0.25")
    assert lines[1].startswith("round   1/3  acc 0.9000  loss 0.5000  eps 2.50  clip 0.25")
