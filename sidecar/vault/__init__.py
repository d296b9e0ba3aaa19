"""The BYOK vault: customers' own provider keys, sealed with AES-256-GCM under a master key, kept in
Postgres (the truth) and mirrored, sealed, into Redis for the request path (README "The BYOK vault").

crypto.py seals and opens; settings.py holds the master key settings; store.py is the vault itself (the
writes, the request path's `keys_of`, the startup check); mirror.py the Redis side (and the rebuild's
restore); rotate.py re-encrypts under a new master key; api.py the routes."""
