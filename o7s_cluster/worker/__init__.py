"""One worker process: its listener, its sessions' shared state, hand-off and cancel routing between workers."""
