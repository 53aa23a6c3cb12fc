"""The storage node (SAN mode): duplicates LUNs and exposes them to proxies for its clients."""
