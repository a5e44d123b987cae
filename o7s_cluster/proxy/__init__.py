"""The session core: pure code over bytes that decides what a pooled session sends each way.

No trio, no sockets, no clock reads: the trio layer (`o7s_cluster.net`) feeds it bytes and the time,
sends what it returns and applies its decisions (attach a backend, release it, wait for a token).
"""
