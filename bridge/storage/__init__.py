"""Where the worklist lives: the folder backend (durable .wl files, the in-memory index and its
watcher), MPPS instances, and the PostgreSQL backend.
"""
