"""The job's model, as its owner starts it: what every site's model must match.

A network server holds no torch (and no task code runs in it), so ``secagg server`` runs this
module in a child process when it starts: it builds the job's task and its initial model (seeded
by the job, or the job's ``initial_model``) and prints the model's signature (names, shapes,
dtypes and a digest of its weights), its class and its parameter count as one JSON line. The
server checks every site against that, the first to join included: a site with another model is
refused by name, and never fixes what "the job's model" is.

    python -m secagg.fingerprint '{"task": ...}'   # the job's RunConfig as JSON
"""

from __future__ import annotations

import json
import sys
from typing import Any

from secagg.config import RunConfig
from secagg.errors import SecAggError


def fingerprint(config: RunConfig) -> dict[str, Any]:
    """The job's model: ``model`` (``ModelSignature.to_wire``), ``class`` and ``parameters``."""
    from secagg.builtin import task_for
    from secagg.client import build_model, signature_of
    from secagg.flatten import flatten

    model = build_model(task_for(config), config)
    vector, layout = flatten(model.state_dict())
    return {
        "model": signature_of(vector, layout).to_wire(),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> int:
    """Read the job's config (JSON, the first argument), print its model's fingerprint
    (JSON), or say why it cannot be built in one line on stderr (exit 1)."""
    try:
        config = RunConfig(**json.loads(sys.argv[1])).validate()
        print(json.dumps(fingerprint(config)))
        return 0
    except SecAggError as err:
        print(str(err).splitlines()[0] if str(err) else type(err).__name__, file=sys.stderr)
    except Exception as err:  # the task's own code: whatever it raises, in one line
        print(f"the task's build_model raised {type(err).__name__}: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
