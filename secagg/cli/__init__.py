"""The ``secagg`` command: click commands only, each parsing flags into one library call.

One module per command over the library: ``keygen``, ``run``, ``provision`` and
``deployment`` (``server``, ``client``, ``status``, ``abort``), each registering its commands
on the group in ``group``; what they share is in ``options``, what a run shows on the console
in ``console``.
"""

from __future__ import annotations

# The commands register themselves on ``main`` when imported.
from secagg.cli import deployment, keygen, provision, run
from secagg.cli.group import main

__all__ = ["deployment", "keygen", "main", "provision", "run"]
