"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename.

    The temp file gets ``mode`` before any byte is written, so a secret is never readable
    by others even for an instant. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, value: Any, mode: int = 0o644) -> Path:
    """``atomic_write`` of pretty-printed JSON; a number that is not finite (a metric no site
    reported) is written ``null``, so every file is valid JSON for any reader."""
    text = json.dumps(finite(value), indent=2, sort_keys=True, default=str, allow_nan=False)
    return atomic_write(path, (text + "\n").encode(), mode)


def finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite replaced by None, at any depth."""
    if isinstance(value, numbers.Real) and not isinstance(value, int):  # numpy's floats too
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
