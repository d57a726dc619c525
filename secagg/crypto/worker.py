"""A CKKS worker process: ``python -m secagg.crypto.worker``, driven by ``ckks._Pool``.

It reads the client context, then (operation, arguments) requests, as pickles on stdin, and
writes each result as a pickle on stdout. Both ends are the same user's processes on one
machine, joined by a private pipe: the secret context never touches the disk or the command
line, and nothing from the network reaches a worker except coefficients the parent has
checked. It exits when stdin closes (the parent exited or closed the pool).
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from secagg.crypto import ckks, seal_format, seeded


def main() -> None:
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    # Nothing else may write to the reply pipe.
    sys.stdout = sys.stderr
    raw = pickle.load(requests)
    context = ckks.load_context(raw)
    secret = seeded.SecretKey(raw, seal_format.shape_of_context(raw))
    while True:
        try:
            op, *args = pickle.load(requests)
        except EOFError:
            return
        result: Any
        try:
            if op == "encrypt":
                slots, shape, scale, seed, start = args
                result = ckks.encrypt_chunks(context, secret, slots, shape, scale, seed, start)
            elif op == "decrypt":
                c0, seeds, sizes, shape, start, scale_bits = args
                result = ckks.decrypt_chunks(context, c0, seeds, sizes, shape, start, scale_bits)
            else:
                result = ckks.WorkerFailure(f"unknown operation {op!r}")
        except Exception as err:  # reported to the parent, which raises a named error
            result = ckks.WorkerFailure(f"{type(err).__name__}: {err}")
        pickle.dump(result, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


if __name__ == "__main__":
    main()
