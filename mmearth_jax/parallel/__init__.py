"""Device mesh, sharding rules and the multi-process runtime."""
