"""Session state a statement may leave behind, and O7s's read-back of it in transaction mode.

A backend goes back to the pool after every transaction, so whatever a client's statements leave in
the server session must either follow the client to its next backend or never reach another client.
After a statement that may have changed session state (a cheap scan of its text says so), O7s reads
the session back once the client is outside a transaction block, in one hidden query:
- settings (`pg_settings` of source `session`, the role, and custom settings the client named) follow
  the client: they are applied on its next backend and reset before anyone else gets this one;
- state that cannot follow (SQL-level prepared statements, session advisory locks, LISTEN, cursors
  WITH HOLD, temporary tables) pins the client to its backend until that state is gone or the client
  leaves (the backend is then reset with DISCARD ALL before reuse).
"""

from __future__ import annotations

import functools
import re
import struct

from o7s_cluster.proxy.params import GUC_NAME, SYNCED_PARAMS

_I32 = struct.Struct("!i")

# Statements that change session state when they start a statement (after optional comments).
_STATEFUL_START = re.compile(
    rb"(?:\A|;)\s*(?:(?:/\*.*?\*/|--[^\n]*(?:\n|\Z))\s*)*"
    rb"(set|reset|discard|prepare|listen|unlisten|do|load|declare|create\s+(?:(?:global|local)\s+)?temp)\b",
    re.IGNORECASE | re.DOTALL,
)
_TEMP = re.compile(rb"\btemp(?:orary)?\b", re.IGNORECASE)
# Possessive: a shorter prefix of a name is followed by a name character, never by "(", so giving
# characters back could not find another match; it only cost time (quadratic in a name's length).
_CALL = re.compile(rb'([A-Za-z_][A-Za-z0-9_$]*+|"(?:[^"]|"")+")\s*\(')
_WORD_BEFORE = re.compile(rb"([A-Za-z_]+)\s*\Z")
# A custom setting a client names in SET/RESET/set_config: it is read back by name.
_CUSTOM_SET = re.compile(rb"\b(?:set|reset)\s+(?:session\s+|local\s+)?([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+)",
                         re.IGNORECASE)
_CUSTOM_CONFIG = re.compile(rb"set_config\s*\(\s*'([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+)'", re.IGNORECASE)

# Words followed by "(" that are SQL syntax or built-in functions free of session side effects.
# Anything else called in a statement (a user's function may SET ROLE, set_config, lock...) makes
# O7s read the session back after the transaction.
_HARMLESS_CALLS = frozenset(w.encode() for w in """
in values exists any all some not and or where from select on using over filter within as by when then else
case array row cast coalesce nullif greatest least count sum avg min max every bool_and bool_or string_agg
array_agg json_agg jsonb_agg json_object_agg jsonb_object_agg xmlagg percentile_cont percentile_disc mode
stddev variance corr rank dense_rank row_number ntile lag lead first_value last_value nth_value
now current_timestamp clock_timestamp statement_timestamp transaction_timestamp timeofday current_date
date_trunc date_part extract age to_char to_date to_timestamp to_number make_date make_time make_timestamp
make_timestamptz make_interval justify_days justify_hours justify_interval isfinite date_bin
lower upper length char_length character_length octet_length bit_length substring substr position strpos
trim btrim ltrim rtrim lpad rpad left right repeat replace reverse split_part concat concat_ws format
initcap md5 sha224 sha256 sha384 sha512 encode decode convert_from convert_to translate quote_ident
quote_literal quote_nullable regexp_replace regexp_match regexp_matches regexp_split_to_array
regexp_split_to_table regexp_like regexp_count regexp_instr regexp_substr starts_with ascii chr to_hex
abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log10 power pow mod div pi degrees radians
sin cos tan asin acos atan atan2 width_bucket random gen_random_uuid uuid_generate_v4 factorial gcd lcm
generate_series generate_subscripts unnest array_length array_upper array_lower array_position
array_positions array_remove array_replace array_append array_prepend array_cat array_to_string
string_to_array cardinality array_dims array_ndims
json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb row_to_json
json_array_length jsonb_array_length json_extract_path jsonb_extract_path json_extract_path_text
jsonb_extract_path_text jsonb_set jsonb_insert jsonb_strip_nulls jsonb_pretty json_typeof jsonb_typeof
json_each jsonb_each json_each_text jsonb_each_text json_array_elements jsonb_array_elements
jsonb_array_elements_text json_array_elements_text json_object_keys jsonb_object_keys jsonb_path_query
jsonb_path_exists jsonb_path_match jsonb_path_query_array jsonb_path_query_first
pg_sleep pg_sleep_for pg_backend_pid pg_typeof version current_setting current_database current_schema
current_schemas current_user session_user current_role pg_column_size pg_relation_size
pg_total_relation_size pg_size_pretty pg_database_size pg_table_size pg_indexes_size txid_current
pg_current_xact_id pg_is_in_recovery pg_postmaster_start_time pg_conf_load_time inet_client_addr
has_table_privilege has_schema_privilege has_database_privilege has_column_privilege
has_function_privilege pg_has_role format_type pg_get_expr pg_get_indexdef pg_get_viewdef
pg_get_constraintdef pg_get_functiondef pg_get_keywords obj_description col_description
shobj_description pg_table_is_visible pg_type_is_visible pg_function_is_visible to_regclass to_regtype
to_regproc pg_get_serial_sequence pg_encoding_to_char pg_notify
numeric decimal varchar char character bit varbit timestamp timestamptz time timetz interval float int
integer smallint bigint text bytea boolean uuid json jsonb date point
into table references key index type function procedure returns exclude unique check primary default
grouping rollup cube sets lateral only recursive materialized
""".split())
# Words before an identifier and "(" that make it a table or type, not a call: INSERT INTO t (a, b).
_NOT_A_CALL_AFTER = frozenset(w.encode() for w in
                              "into table references on index type function procedure view exists returns".split())


SCAN_CACHE_SIZE = 4096    # distinct statement texts whose scan is remembered (per worker)
SCAN_CACHE_MAX_TEXT = 4096  # longer texts are scanned every time, never kept


def may_change_state(sql: bytes | bytearray) -> bool:
    """True when a statement's text may leave session state behind (false positives cost one read-back).

    Most statements are proved harmless by `plainly_stateless` at C speed. Applications send the same
    few texts over and over: the rest are scanned once, unless they carry literals (`aid = 12345`,
    `'x'`): those are rarely sent twice and would only evict the texts that are.
    """
    if plainly_stateless(sql):
        return False
    if len(sql) > SCAN_CACHE_MAX_TEXT or b"'" in sql or _NUMBER.search(sql):
        return _scan(sql)
    return _scan_cached(bytes(sql))


PREPARED_VERDICTS_SIZE = 4096    # distinct extended-protocol texts whose verdict is remembered (per worker)
PREPARED_VERDICTS_MAX_TEXT = 1024
_prepared_verdicts: dict[bytes, bool] = {}


def prepared_may_change_state(text: bytes) -> bool:
    """`may_change_state` of a text sent in a Parse. Those carry their values as parameters ($1), so that
    the same few come again and again, unnamed ones with every execution: the verdict is remembered
    (the memory is emptied when full, never grown past its size)."""
    verdict = _prepared_verdicts.get(text)
    if verdict is None:
        verdict = may_change_state(text)
        if len(text) <= PREPARED_VERDICTS_MAX_TEXT:
            if len(_prepared_verdicts) >= PREPARED_VERDICTS_SIZE:
                _prepared_verdicts.clear()
            _prepared_verdicts[text] = verdict
    return verdict


_TRAILING = b"; \t\r\n\x00"
# First words that are none of `_STATEFUL_START`'s keywords nor their prefixes (select/set, delete/
# declare/do, update/unlisten differ within the word), lower-case.
_PLAIN_FIRST = (b"select", b"insert", b"update", b"delete", b"with", b"values", b"table")
# A text with a number or a string literal in it is not worth a place in the scan's cache.
_NUMBER = re.compile(rb"(?:\A|[^A-Za-z0-9_$])[0-9]")  # not a digit of a name (t1) or parameter ($1)


def plainly_stateless(sql: bytes | bytearray) -> bool:
    """True only when `_scan` would say False, proved by bytes operations: one statement (no ";" but
    trailing ones) that starts with a plain DML word (no comment or keyword before it), calls nothing
    (no "(" at all) and has no "temp" anywhere. A "(" or ";" inside a string, identifier or comment
    makes it False (the scan then decides): it may err only towards scanning."""
    if b"(" in sql:
        return False
    low = sql.lower()
    if b"temp" in low:
        return False
    body = low.rstrip(_TRAILING)
    return b";" not in body and body.lstrip().startswith(_PLAIN_FIRST)


def _scan(sql: bytes | bytearray) -> bool:
    # One statement (no ";" before its end) can only start with the keyword: anchor the search there.
    head = _STATEFUL_START.match if sql.rstrip(_TRAILING).find(b";") < 0 else _STATEFUL_START.search
    if head(sql) or (b"temp" in sql.lower() and _TEMP.search(sql)):
        return True
    if b"(" not in sql:
        return False
    for match in _CALL.finditer(sql):
        name = match.group(1)
        if name[:1] == b'"':
            return True
        if name.lower() in _HARMLESS_CALLS:
            continue
        before = _WORD_BEFORE.search(sql, max(0, match.start() - 24), match.start())
        if before is not None and before.group(1).lower() in _NOT_A_CALL_AFTER:
            continue
        return True
    return False


_scan_cached = functools.lru_cache(maxsize=SCAN_CACHE_SIZE)(_scan)


def custom_names(sql: bytes | bytearray) -> list[str]:
    """Custom (dotted) settings a statement names, lower-cased: they are read back by name."""
    found = [m.group(1) for m in _CUSTOM_SET.finditer(sql)] + [m.group(1) for m in _CUSTOM_CONFIG.finditer(sql)]
    out = []
    for raw in found:
        name = bytes(raw).decode("ascii", "replace").lower()
        if GUC_NAME.match(name) and name not in out:
            out.append(name)
    return out


STATE_ROW = " state"  # the read-back row that lists state which cannot follow the client
_STATE_SQL = (
    f"SELECT '{STATE_ROW}', pg_catalog.concat_ws(', ', "
    "CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) "
    "THEN 'SQL prepared statements' END, "
    "CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid() "
    "AND locktype = 'advisory') THEN 'advisory locks' END, "
    "CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) THEN 'LISTEN' END, "
    "CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable) THEN 'cursors WITH HOLD' END, "
    "CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) "
    "THEN 'temporary tables' END)"
)


def readback_sql(custom: list[str]) -> str:
    """One query whose rows are (name, value): the session's settings, its role, the custom settings
    named so far, and the state row."""
    parts = ["SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'",
             "SELECT 'role', pg_catalog.current_setting('role')"]
    for name in custom:
        parts.append(f"SELECT '{name}', pg_catalog.current_setting('{name}', true)")
    parts.append(_STATE_SQL)
    return " UNION ALL ".join(parts)


class Readback:
    """The rows of one read-back, as they arrive."""

    __slots__ = ("settings", "state", "failed")

    def __init__(self) -> None:
        self.settings: dict[str, str] = {}
        self.state = ""
        self.failed = False

    def row(self, payload: bytes | bytearray | memoryview, reported: dict[str, str]) -> None:
        """One DataRow of two text columns."""
        values: list[str | None] = []
        pos = 2
        try:
            for _ in range(2):
                (n,) = _I32.unpack_from(payload, pos)
                values.append(bytes(payload[pos + 4: pos + 4 + n]).decode("utf-8", "replace") if n >= 0 else None)
                pos += 4 + max(n, 0)
        except struct.error:  # not the row O7s asked for: the read-back cannot be trusted
            self.failed = True
            return
        name, value = values
        if name is None:
            return
        if name == STATE_ROW:
            self.state = value or ""
        elif name == "role":
            if value and value != "none":
                self.settings["role"] = value
        elif value is not None and not name.startswith("transaction_") and GUC_NAME.match(name):
            # Reported parameters follow through ParameterStatus; the rest through this read-back.
            if SYNCED_PARAMS.get(name, name) not in reported:
                self.settings[name] = value
