"""sync_sql: what makes a backend's settings a client's, without sockets."""

from __future__ import annotations

from o7s_cluster.proxy.params import BackendSettings, sync_sql


def _backend(reported: dict[str, str], applied: dict[str, str] | None = None) -> BackendSettings:
    b = BackendSettings()
    b.reported = dict(reported)
    b.applied = dict(applied or {})
    return b


def test_nothing_to_do_when_the_backend_already_matches():
    b = _backend({"DateStyle": "ISO, MDY", "application_name": "app", "server_version": "15"})
    assert sync_sql({"DateStyle": "ISO, MDY", "application_name": "app"}, b) == ""


def test_a_differing_reported_value_is_set():
    b = _backend({"DateStyle": "ISO, MDY", "application_name": "other"})
    sql = sync_sql({"DateStyle": "ISO, MDY", "application_name": "app"}, b)
    assert sql == "SELECT pg_catalog.set_config('application_name', E'app', false);"
    assert b.applied == {}  # reported settings are followed through ParameterStatus, not `applied`


def test_an_unreported_setting_is_applied_and_remembered():
    b = _backend({"DateStyle": "ISO, MDY"})
    sql = sync_sql({"DateStyle": "ISO, MDY", "search_path": "s1"}, b)
    assert "set_config('search_path', E's1', false)" in sql
    assert b.applied == {"search_path": "s1"}
    assert sync_sql({"DateStyle": "ISO, MDY", "search_path": "s1"}, b) == ""


def test_what_the_previous_client_applied_is_reset():
    b = _backend({"DateStyle": "ISO, MDY"}, {"search_path": "s1", "role": "r1"})
    sql = sync_sql({"DateStyle": "ISO, MDY"}, b)
    assert 'RESET "search_path";' in sql and "RESET ROLE;" in sql
    assert b.applied == {}
