"""The ``secagg`` command: click commands only, each parsing flags into one library call.

One module per command over the library: ``keygen``, ``run``, ``provision`` and
``deployment`` (``server``, ``client``, ``status``, ``abort``); what they share is in
``options``, what a run shows on the console in ``console``.
"""

from __future__ import annotations

import warnings

import click

from secagg.cli.options import _epilog, _note


@click.group(
    epilog=_epilog(
        "secagg keygen && secagg run --he     HE secure aggregation on the digits job",
        "secagg run --help                    every flag of a command, with its default",
    )
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="secagg")
def main(debug: bool) -> None:
    """Federated learning with homomorphic-encryption secure aggregation."""
    warnings.showwarning = _note


# The commands register themselves on ``main`` when imported.
from secagg.cli import deployment, keygen, provision, run  # noqa: E402

__all__ = ["deployment", "keygen", "main", "provision", "run"]
