"""MLflow connection pools: sized to atm-watch's workers, and a pool that ran dry is named as such."""

from __future__ import annotations

import argparse

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException

from atm.adapters.base import BackendUnavailable, PoolExhausted
from atm.adapters.mlflow_backend import MlflowBackend, _translate


def test_a_database_pool_that_ran_dry_is_not_an_unreachable_tracker(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real SQLAlchemy pool of one connection, held, and MLflow's own session wrapper around the second call.
    from mlflow.store.db.db_types import SQLITE
    from mlflow.store.db.utils import _get_managed_session_maker
    from sqlalchemy.orm import sessionmaker

    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "1")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=1, max_overflow=0, pool_timeout=0.01)
    held = engine.connect()
    managed = _get_managed_session_maker(sessionmaker(bind=engine), SQLITE)

    def query() -> None:
        with managed() as session:
            session.execute(sqlalchemy.text("select 1"))

    try:
        with pytest.raises(PoolExhausted) as got:
            _translate("run r", query)
    finally:
        held.close()
    said = str(got.value)
    assert said.startswith("run r: this process ran out of connections to the tracking database")
    assert "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE 1" in said and "lower atm-watch --workers" in said
    assert "QueuePool limit of size 1 overflow 0 reached" in said
    assert isinstance(got.value, BackendUnavailable)  # retried with back-off like an outage


def test_a_servers_pool_that_ran_dry_names_the_servers_settings() -> None:
    def call() -> None:
        raise MlflowException("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")

    with pytest.raises(PoolExhausted, match="the MLflow server ran out of connections to its database: raise "
                                            "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"):
        _translate("run r", call)


def test_other_errors_keep_their_translation() -> None:
    def refused() -> None:
        raise ConnectionError("connection refused")

    with pytest.raises(BackendUnavailable) as got:
        _translate("run r", refused)
    assert not isinstance(got.value, PoolExhausted)
    with pytest.raises(KeyError):
        _translate("run r", lambda: {}["x"])


def test_atm_watch_sizes_the_database_pool_to_its_workers(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from atm.watcher.cli import _backend

    for name in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "MLFLOW_HTTP_POOL_MAXSIZE"):
        monkeypatch.delenv(name, raising=False)
    from atm.signing import resolve_key

    args = argparse.Namespace(backend="mlflow", tracking_uri=mlflow_uri, experiment="e", workers=6)
    backend = _backend(args, resolve_key())
    assert isinstance(backend, MlflowBackend)
    engine = backend.client._tracking_client.store.engine
    assert (engine.pool.size(), engine.pool._max_overflow) == (7, 7)  # 6 workers and the listing, as many in reserve
