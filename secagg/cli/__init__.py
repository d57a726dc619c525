"""The ``secagg`` command: click commands only, each parsing flags into one library call.

One module per command over the library: ``keygen``, ``run``, ``provision``, ``server``,
``client``, ``status`` and ``abort``, each registering its command on the group in ``group``;
what they share (the flags of several commands) is in ``options``, what a run shows on the
console in ``console``.
"""

from __future__ import annotations

# The commands register themselves on ``main`` when imported.
from secagg.cli import abort, client, keygen, provision, run, server, status
from secagg.cli.group import main

__all__ = ["abort", "client", "keygen", "main", "provision", "run", "server", "status"]
