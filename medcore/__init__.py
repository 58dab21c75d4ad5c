"""Layer 0 shared by broker/ and sessions/: the error tree and the clocks (stdlib only, imports nothing of ours)."""
