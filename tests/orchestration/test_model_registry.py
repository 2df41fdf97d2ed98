"""Pointing MLflow's fluent API at a run's store leaves no trace once the block ends."""

import os

import mlflow

from orchestration.model_registry import fluent_tracking


def test_fluent_tracking_restores_the_registry_and_its_environment(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)  # put back as they were after the test
    mlflow.set_tracking_uri(None)  # no explicit URIs
    mlflow.set_registry_uri(None)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'before.db'}"
    inside = f"sqlite:///{tmp_path / 'inside.db'}"
    with fluent_tracking(inside):
        assert mlflow.get_tracking_uri() == inside and mlflow.get_registry_uri() == inside
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'before.db'}"
    later = f"sqlite:///{tmp_path / 'later.db'}"
    mlflow.set_tracking_uri(later)
    assert mlflow.get_registry_uri() == later, "the registry follows the tracking URI again"
    mlflow.set_tracking_uri(None)
