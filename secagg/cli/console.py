"""What a run shows on the console: the progress bar, a line per round, the summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click


def _progress(
    total: int,
    he: bool,
    echo: Callable[[str], None] = click.echo,
    lead: str = "accuracy",
    bar: _Bar | None = None,
) -> Callable[[Any], None]:
    """One line per round: the task's evaluation metrics (``lead``, the job's headline metric,
    first), time, bytes, and for HE the time spent encrypting, adding and decrypting; the
    ``bar`` shows the headline metric from then on."""

    def show(m: Any) -> None:
        if bar is not None:
            from secagg.labels import headline

            bar.latest = headline(lead, m.value(lead))
        evaluated = {k: v for k, v in m.metrics.items() if not k.startswith("train_")}
        # The job's headline metric first, then the task's others, then the loss.
        names = sorted(evaluated, key=lambda name: name != lead)
        shown = "".join(f"  {_SHORT.get(k, k)} {evaluated[k]:.4f}" for k in names)
        loss = f"  loss {m.loss:.4f}" if m.loss == m.loss else "  (not evaluated)"
        # the loss as the headline (a task of your own that names no metric) leads the line
        shown, loss = (loss, shown) if lead == "loss" else (shown, loss)
        if m.epsilon == m.epsilon:  # with differential privacy: the job's epsilon so far
            loss += f"  eps {m.epsilon:.2f}"
        if "train_dp_clip" in m.metrics:  # adaptive clipping: the clip the round used
            loss += f"  clip {m.metrics['train_dp_clip']:.3g}"
        line = (
            f"round {m.round:>3}/{total}{shown}{loss}  {m.round_seconds:6.2f}s  "
            f"up {_mb(m.bytes_up)} down {_mb(m.bytes_down)}"
        )
        if he:
            line += (
                f"  enc {m.encrypt_seconds:.2f}s agg {m.aggregate_seconds:.2f}s "
                f"dec {m.decrypt_seconds:.2f}s"
            )
        echo(line)

    return show


_SHORT = {"accuracy": "acc"}

#: what the set-up steps before the first round are called on the progress bar
_SETUP = {
    "clients": "loading data and building clients",
    "tracking": "opening the MLflow store",
    "replay": "replaying the rounds done",
}


class _Bar:
    """What a terminal shows while a run works: the set-up (clients built, the MLflow store
    opened), then the rounds, with the current round's phase, its clients done of N and the
    run's ETA. Drawn only when stdout is a terminal, so logs and pipes keep one line per
    round; ``quiet`` also drops the per-round lines. Use as the run's ``on_progress``."""

    def __init__(self, rounds: int, done: int, quiet: bool) -> None:
        self.rounds, self.done, self.quiet = rounds, done, quiet
        #: the last round's headline metric, shown beside the phase
        self.latest = ""
        self.drawn = not quiet and sys.stdout.isatty()
        self._setup: Any = None
        self._rounds: Any = None
        if self.drawn:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._setup = tqdm(
                desc="starting", bar_format="{desc} [{elapsed}]", leave=False, file=sys.stdout
            )

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in (self._setup, self._rounds):
            if bar is not None:
                bar.close()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.drawn:
            return
        if phase in _SETUP:
            self._setup.set_description_str(f"{_SETUP[phase]} {done}/{total}")
            return
        if self._rounds is None:  # the first round starts: its ETA counts from here
            self._setup.close()
            self._setup = None
            self._rounds = self._tqdm(
                total=self.rounds,
                initial=self.done,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
                bar_format="{desc} |{bar:30}| {n_fmt}/{total_fmt} rounds "
                "[{elapsed}, ETA {remaining}]",
            )
        self._rounds.set_description_str(
            f"round {self.done + 1}/{self.rounds}: {phase} {done}/{total}{self._latest()}"
        )

    def _latest(self) -> str:
        return f" (last round: {self.latest})" if self.latest else ""

    def round_line(self, line: str) -> None:
        """A round is over: print its line (above the bar) and move the bar on."""
        self.done += 1
        if self.quiet:
            return
        if self._rounds is None:
            click.echo(line)
            return
        self._rounds.write(line, file=sys.stdout)
        if self.done < self.rounds:
            self._rounds.set_description_str(
                f"round {self.done + 1}/{self.rounds}{self._latest()}", refresh=False
            )
        self._rounds.update(1)


def _summary(result: Any, model: bool) -> None:
    """The closing lines of a run: its headline metric, where the results went, MLflow."""
    from secagg.labels import headline

    parameters = f" ({result.num_parameters:,} parameters)" if result.num_parameters else ""
    click.echo(
        f"done: final {headline(result.config.headline, result.final)} after "
        f"{_rounds(len(result.rounds))} in {result.seconds:.1f}s{parameters}"
    )
    click.echo(f"  results: {result.output_dir / 'results.json'}")
    if model:
        click.echo(f"  model:   {result.output_dir / 'model.pt'}")
    if result.mlflow_run_id and result.tracking_uri:
        from secagg.tracking import run_url, ui_command

        experiment = result.mlflow_experiment_id
        where = (
            run_url(result.tracking_uri, experiment, result.mlflow_run_id)
            if experiment
            else f"in {result.tracking_uri}"
        )
        click.echo(f"  MLflow:  {result.run_name or result.mlflow_run_id}  {where}")
        command = ui_command(result.tracking_uri)
        if command:
            click.echo(f"  start the UI first: {command}")


def _mb(n: float) -> str:
    return f"{n / 1e6:7.2f} MB"


# --- deployment: provision, server, client, status, abort --------------------------------------


def _rounds(count: int) -> str:
    """``1 round``, ``3 rounds``."""
    return f"{count} round{'' if count == 1 else 's'}"
