"""The ``secagg`` click group, which every command module registers its commands on."""

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
