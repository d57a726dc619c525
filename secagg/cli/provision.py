"""``secagg provision``: a project's CA, certificates, keys and one startup kit per party."""

from __future__ import annotations

from pathlib import Path

import click

from secagg.cli.group import main
from secagg.cli.options import (
    _epilog,
    _friendly,
)


@main.command(
    epilog=_epilog(
        "secagg provision --server fl.example.org:8443 --clients site-1,site-2 --out project",
        "secagg provision --project-file project.toml",
    )
)
@click.option(
    "--server",
    "server_address",
    help="The server's HOST[:PORT] as sites will reach it [default port: 8443].",
)
@click.option("--clients", "sites", help="Site names, comma-separated: site-1,site-2,...")
@click.option(
    "--project-file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML file with name, server and clients (and, if you like, threshold, "
    "graph_above and protection), instead of those flags.",
)
@click.option("--project", "project_name", default="secagg", show_default=True, help="Name.")
@click.option(
    "--out",
    "out_dir",
    default="project",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the CA and one kit per party.",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=0),
    default=0,
    help="The fewest contributors any sum a site unmasks or decrypts may have, signed into "
    "every kit [default: max(3, 2n/3 + 1) of the n sites, at most n].",
)
@click.option(
    "--graph-above",
    type=click.IntRange(min=4),
    default=200,
    show_default=True,
    help="Rounds of more sites than this mask over a neighbour graph (each site with about "
    "2 x 80 others, not all), signed into every kit.",
)
@click.option(
    "--protection",
    type=click.Choice(["masked", "he", "plain"]),
    default="masked",
    show_default=True,
    help="The least protection every site requires of a job the server sends, signed into "
    "every kit: masked (HE with pairwise masks), he (HE), plain (any).",
)
@click.option(
    "--require-dp",
    nargs=2,
    type=click.FloatRange(min=0, min_open=True),
    metavar="NOISE CLIP",
    help="Every site requires distributed DP of at least this noise multiplier and at most "
    "this clipping bound, signed into every kit.",
)
@click.option("--force", is_flag=True, help="Replace existing kits.")
@_friendly
def provision(
    server_address: str | None,
    sites: str | None,
    project_file: str | None,
    project_name: str,
    out_dir: str,
    threshold: int,
    graph_above: int,
    protection: str,
    require_dp: tuple[float, float] | None,
    force: bool,
) -> None:
    """Make a CA, certificates, CKKS keys and one startup kit per party."""
    from secagg import provision as kits
    from secagg.crypto.neighbours import exposure

    if project_file:
        import tomllib

        spec = tomllib.loads(Path(project_file).read_text())
        server_address = spec.get("server", server_address)
        names = list(spec.get("clients", []))
        project_name = spec.get("name", project_name)
        threshold = int(spec.get("threshold", threshold))
        graph_above = int(spec.get("graph_above", graph_above))
        protection = str(spec.get("protection", protection))
    else:
        names = [name.strip() for name in (sites or "").split(",") if name.strip()]
    if not server_address or not names:
        raise click.UsageError(
            "give --server HOST[:PORT] and --clients a,b,... (or --project-file)"
        )
    click.echo(
        f"provisioning project '{project_name}': server {server_address}, {len(names)} sites"
    )
    folders = kits.provision(
        out_dir,
        server_address,
        names,
        project_name,
        force=force,
        threshold=threshold,
        graph_above=graph_above,
        protection=protection,
        dp_noise=require_dp[0] if require_dp else 0.0,
        dp_clip=require_dp[1] if require_dp else 0.0,
    )
    policy = kits.load_kit(folders["server"], "server").policy()
    click.echo(
        f"  round policy: every sum has at least {policy.threshold} of at most "
        f"{policy.max_round} sites (signed by the CA into every kit); a lying server with up "
        f"to {policy.tolerated()} colluding site(s) reads no single update"
    )
    required = {"masked": "HE with pairwise masks", "he": "HE", "plain": "nothing"}
    dp = (
        f", distributed DP (noise multiplier >= {policy.dp_noise:g}, clip <= {policy.dp_clip:g})"
        if policy.dp_noise
        else ""
    )
    click.echo(f"  every site requires of a job: {required[policy.protection]}{dp}")
    if policy.graph(len(names)):
        click.echo(
            f"  neighbour graph: each site masks with its {policy.picks} picks and those that "
            f"picked it; a lying server with a third of the sites colluding reads a given "
            f"site's update with chance {exposure(policy.picks, policy.pick_threshold, 1 / 3):.1e}"
        )
    if policy.threshold < 3:
        click.echo(
            f"  warning: with a threshold of {policy.threshold}, a sum of two is decrypted, and "
            "each of its two sites reads the other's update (the sum minus its own); pass "
            "--threshold 3 or more to protect single updates",
            err=True,
        )
    click.echo(f"  {folders['ca']}/  certificate authority (keep ca.key offline)")
    click.echo(f"  {folders['server']}/  server kit: public CKKS context, no secret key")
    for name in names:
        click.echo(f"  {folders[name]}/  kit of site {name}: holds the secret CKKS context")
    click.echo(f"  {folders['admin']}/  admin kit for 'secagg status' and 'secagg abort'")
    click.echo(
        "give each party its own folder (files are 0600); never give a site kit to the server"
    )
