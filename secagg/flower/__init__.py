"""secagg's HE secure aggregation for Flower apps: one line on each side.

In the ClientApp, around the user's unchanged ``@app.train`` and ``@app.evaluate``::

    app = ClientApp(mods=[secagg.flower.he_mod()])

In the ServerApp, in place of ``FedAvg``::

    strategy = secagg.flower.HEFedAvg(fraction_train=1.0)

Each side imports only its own half: the ServerApp's process never imports TenSEAL or reads a
secret key (``strategy``); the nodes hold the keys and the model (``node``). Needs the
``flower`` extra (``pip install secagg[flower]``: Flower 1.42).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secagg.flower.node import he_mod
    from secagg.flower.strategy import HEFedAvg


def __getattr__(name: str) -> Any:
    # Lazily: a ServerApp that imports HEFedAvg must not import the node side (TenSEAL).
    if name == "he_mod":
        from secagg.flower.node import he_mod

        return he_mod
    if name == "HEFedAvg":
        from secagg.flower.strategy import HEFedAvg

        return HEFedAvg
    raise AttributeError(f"module 'secagg.flower' has no attribute {name!r}")


__all__ = ["HEFedAvg", "he_mod"]
