"""Sans-IO PostgreSQL wire protocol: pure code over bytes, no sockets, no trio (like h11 for HTTP)."""
