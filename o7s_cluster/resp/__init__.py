"""Sans-IO RESP (the Redis protocol, RESP2 and RESP3): the codec (codec.py) and per-org namespacing
(namespace.py, commands.py). No sockets, no trio: the shell in net/resp_*.py only moves bytes."""
