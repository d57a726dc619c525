"""``secagg status``: the job's state, as the server tells the project's admin."""

from __future__ import annotations

import json
import math

import click

from secagg.cli.group import main
from secagg.cli.options import _ADMIN_KIT, _epilog, _friendly


@main.command(
    epilog=_epilog("secagg status --kit project/admin", "secagg status --kit project/admin --json")
)
@_ADMIN_KIT
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@_friendly
def status(kit_dir: str, as_json: bool) -> None:
    """Show the job's state: round, connected sites, last metrics (admin kit)."""
    from secagg.deploy import admin_call

    info = admin_call(kit_dir, "Status", {})
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"project {info['project']}, job {info['job']} ({info['job_id'][:12]}): "
        f"{info['completed']}/{info['rounds']} rounds done; {info['phase']}"
    )
    if info.get("aborted"):
        click.echo(f"  aborted: {info['aborted']}")
    for site in info["sites"]:
        state = "connected" if site["connected"] else "not connected"
        line = f"  {site['name']:<16} {state:<14} round {site['applied']}"
        if site.get("error"):
            line += f"  failed: {site['error']}"
        click.echo(line)
    from secagg.labels import headline

    for row in info["history"]:
        value = row.get("value")
        click.echo(
            f"  round {row['round']:>3}: "
            f"{headline(row.get('metric', 'metric'), math.nan if value is None else value)}, "
            f"{row['clients']} sites"
        )
    for line in info.get("refusals", []):
        click.echo(f"  refused: {line}")
