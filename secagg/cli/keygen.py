"""``secagg keygen``: the CKKS keys a job's clients and server load."""

from __future__ import annotations

from pathlib import Path

import click

from secagg.cli.group import main
from secagg.cli.options import (
    _epilog,
    _friendly,
)
from secagg.crypto.params import CkksParams


@main.command(
    epilog=_epilog(
        "secagg keygen                          keys/ with the defaults (128-bit security)",
        "secagg keygen --out k2 --poly-degree 16384 --coeff-bits 60,60,60",
    )
)
@click.option(
    "--out",
    "out_dir",
    default="keys",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for client.ctx (secret), server.ctx and manifest.json.",
)
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.option(
    "--poly-degree",
    type=click.Choice(["2048", "4096", "8192", "16384", "32768"]),
    default="8192",
    show_default=True,
    help="CKKS polynomial modulus degree N (secagg packs N coefficients a ciphertext).",
)
@click.option(
    "--coeff-bits",
    default="60,60",
    show_default=True,
    help="Bit sizes of the coefficient-modulus primes, data primes first, special prime last; "
    "refused below 128-bit security.",
)
@_friendly
def keygen(out_dir: str, force: bool, poly_degree: str, coeff_bits: str) -> None:
    """Make CKKS keys: client.ctx (secret, for clients), server.ctx (public), manifest.json."""
    from secagg import keys

    try:
        bits = tuple(int(b) for b in coeff_bits.split(","))
    except ValueError as err:
        raise click.BadParameter(
            "give comma-separated integers, e.g. 60,60", param_hint="--coeff-bits"
        ) from err
    params = CkksParams(int(poly_degree), bits)
    keys.check_can_generate(out_dir, params, force)  # refuse before saying we generate
    click.echo(f"generating CKKS keys (N={poly_degree}, primes {list(bits)})...")
    manifest = keys.generate(out_dir, params, force=force)
    out = Path(out_dir)
    click.echo(f"  {out / keys.CLIENT_FILE}  secret context: clients only (mode 600)")
    click.echo(f"  {out / keys.SERVER_FILE}  public context: the server (no secret key)")
    click.echo(f"  {out / keys.MANIFEST_FILE}  fingerprint {manifest['fingerprint']}")
