"""The shell: I/O adapters around the core (settings files, TLS, sockets, bodies, upstream, storages, audit file, metrics)."""
