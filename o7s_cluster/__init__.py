"""O7s: a multi-tenant PostgreSQL-wire proxy cluster on trio."""

__version__ = "0.1.0"
