"""The processes of a cluster: the local supervisor of worker processes, and the Ray engine past one machine."""
