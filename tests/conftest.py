"""Ray reads its settings (token authentication, ...) once per process, when it is first
imported: ``sim`` sets them, so it is imported before any test module can import Ray."""

import pytest

import sim  # noqa: F401


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> int:
    """Messages take their run and sender from Flower's TaskIdentity, set only inside a run: set
    them as Flower's simulation does (the server's node); the run id."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    run_id = 1
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    return run_id
