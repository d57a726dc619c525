"""``secagg client``: take part in a job as one site of a provisioned project."""

from __future__ import annotations

import time

import click

from secagg.cli.group import main
from secagg.cli.options import _epilog, _friendly
from secagg.errors import SecAggError


@main.command(
    epilog=_epilog(
        "secagg client --kit project/site-1 --data-dir /data",
        "secagg client --kit project/site-2 --data-dir /data/site-2 --shard all --device cuda",
    )
)
@click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="This site's kit."
)
@click.option(
    "--data-dir",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="This site's data, handed to the task.",
)
@click.option(
    "--download/--no-download",
    default=False,
    show_default=True,
    help="Let torchvision download the dataset (needs network).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="The site's model.pt and metrics.json [default: runs/<job>-<site>].",
)
@click.option(
    "--shard",
    type=click.Choice(["auto", "all"]),
    default="auto",
    show_default=True,
    help="auto: the job's Dirichlet shard for this site; all: every example in --data-dir.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds to keep retrying while the server is not up.",
)
@_friendly
def client(
    kit_dir: str,
    data_dir: str,
    download: bool,
    device: str,
    workdir: str | None,
    shard: str,
    wait: float,
) -> None:
    """Take part in a job as one site: train when asked, keep the global model locally."""
    from secagg.deploy import participate

    def log(line: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {line}")

    outcome = participate(kit_dir, data_dir, download, device, workdir, shard, wait, log)
    if outcome != "done":
        raise SecAggError(f"the job ended unfinished: {outcome}")
    log("the job is done")
