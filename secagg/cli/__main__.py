"""``python -m secagg.cli``: the ``secagg`` command."""

from secagg.cli import main

main()
