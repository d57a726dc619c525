"""A run's output folder is new, empty, or (to resume) a run folder: never the user's own."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from secagg.config import RunConfig
from secagg.errors import CheckpointError
from secagg.outputs import check_new_output
from secagg.records import RunRecords
from secagg.transport.grpc_client import ServerGone, _guard


def test_a_folder_with_the_users_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("mine")
    (tmp_path / "model.pt").write_text("mine too")
    config = RunConfig(output_dir=str(tmp_path), tracking=False)
    with pytest.raises(
        CheckpointError, match=r"is not a run folder \(it holds model\.pt, results\.json\)"
    ):
        RunRecords.open(config, None)
    assert (tmp_path / "results.json").read_text() == "mine"


def test_new_empty_and_interrupted_folders_are_accepted(tmp_path: Path) -> None:
    check_new_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_new_output(tmp_path / "empty")
    (tmp_path / "early" / "aggregates").mkdir(parents=True)  # stopped before round 1 ended
    check_new_output(tmp_path / "early")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        check_new_output(tmp_path / "run")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        check_new_output(tmp_path / "file")


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "cut"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_transient_statuses_make_a_site_rejoin(code: grpc.StatusCode) -> None:
    """ServerGone is what ``participate`` catches to join again (with backoff)."""

    def call() -> None:
        raise _Status(code)

    with pytest.raises(ServerGone):
        _guard(call)
