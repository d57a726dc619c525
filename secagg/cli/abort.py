"""``secagg abort``: stop the job; the server tells every site why (admin kit)."""

from __future__ import annotations

import click

from secagg.cli.group import main
from secagg.cli.options import _ADMIN_KIT, _epilog, _friendly


@main.command(epilog=_epilog('secagg abort --kit project/admin --reason "maintenance"'))
@_ADMIN_KIT
@click.option(
    "--reason",
    default="no reason given",
    show_default=True,
    help="What the server tells every site (after 'aborted by the administrator: ').",
)
@_friendly
def abort(kit_dir: str, reason: str) -> None:
    """Stop the job: the server tells every site and exits (admin kit)."""
    from secagg.deploy import admin_call

    admin_call(kit_dir, "Abort", {"reason": reason})
    click.echo(f"abort sent: {reason}")
