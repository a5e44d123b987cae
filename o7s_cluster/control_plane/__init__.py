"""The control plane: the `platform` schema in PostgreSQL, and everything that reads or writes it.

Modules:
    db.py         connecting, `CatalogError`, `TierLimits`: what every other module here shares
    migrate.py    `o7s migrate`: the SQL files in migrations/, in name order
    orgs.py       `Admin`: org administration for the CLI, one transaction per operation
    catalog.py    `TrioCatalog`: the proxy's cached, single-flight reads (logins, backend targets)
    vault.py      `Vault`: encryption of backend DSNs with O7S_SECRET_KEY
    dsn.py        `BackendTarget`: parsing and redacting backend DSNs
    embedded.py   the throwaway local PostgreSQL and demo org of a bare `o7s serve`
"""
