"""A run's folder: where a new run writes, what makes a folder safe to write a run into, and
the latest run under ``runs/`` (what ``--resume`` continues)."""

from __future__ import annotations

import time
from pathlib import Path

from secagg.config import TrackingSettings
from secagg.errors import CheckpointError
from secagg.server import AGGREGATES_DIR, STATE_FILE

RESULTS_FILE = "results.json"
#: where ``secagg run --transport grpc`` keeps each site's folder and log in its run folder
SITES_DIR = "sites"


def new_output_dir(settings: TrackingSettings) -> Path:
    """``runs/<time>-<job>-<he|plain>`` unless the settings name one."""
    if settings.output_dir:
        return Path(settings.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{settings.job_name}-{settings.mode}"


def check_new_output(output: Path) -> None:
    """Refuse ``output`` as a new run's folder unless it is new or empty. A run writes
    ``results.json``, ``model.pt`` and more there, so any other folder (the user's own
    ``results.json`` and ``model.pt``, say) would be overwritten silently. Exceptions: a
    folder holding only ``aggregates/`` (what a server stopped before its first round left)
    and ``sites/`` (the site folders of ``secagg run --transport grpc``)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise CheckpointError(f"{output} is a file, not a folder; choose another output folder")
    if (output / STATE_FILE).exists():
        raise CheckpointError(
            f"{output}/ already holds a run; pass --resume to continue it "
            "or choose another --output"
        )
    held = sorted(entry.name for entry in output.iterdir())
    if not set(held) <= {AGGREGATES_DIR, SITES_DIR}:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise CheckpointError(
            f"{output}/ exists and is not a run folder (it holds {shown}); a run writes "
            "results.json and model.pt there and would overwrite them: choose a new or empty "
            "folder"
        )


def latest_run_dir(root: str | Path = "runs") -> Path:
    """The most recently modified run directory under ``root`` (for --resume without --output)."""
    candidates = sorted(Path(root).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --output DIR of the run")
    return candidates[-1].parent
