"""The trio layer of the data path: moves bytes between sockets and applies the session core's decisions."""
