"""Named errors. Each message says what went wrong and how to fix it.

Only ``secagg.cli`` turns these into one-line terminal errors; library code raises them.
"""


class SecAggError(Exception):
    """Base class of every error secagg raises on purpose."""


class ConfigError(SecAggError):
    """A job file or flag has a value secagg cannot run with."""


class KeyFileError(SecAggError):
    """Keys are missing, of the wrong kind, unreadable, or would be overwritten."""


class WeakParametersError(KeyFileError):
    """CKKS parameters below 128-bit security."""


class PayloadError(SecAggError):
    """A payload is corrupt, truncated, forged, replayed, or was made with other keys or settings.

    ``reason`` names what was wrong in one word (``truncated``, ``wrong-key``, ``wrong-round``,
    ``duplicate``, ...), for logs, tests and the server's refusal messages.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class DatasetError(SecAggError):
    """A dataset is missing or unreadable."""


class CheckpointError(SecAggError):
    """A run directory cannot be resumed."""


class TaskError(SecAggError):
    """The user's task raised, or returned something secagg cannot use; the message names the
    site and the task's method."""
