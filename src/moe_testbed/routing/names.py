"""The routing vocabulary the config validates against, importable without torch."""

SCOPES = ("sequence", "microbatch", "global")  # balancing scope: docs/routing.md#scope
DROP_POLICIES = ("probs", "position")  # which slots capacity keeps: routing/capacity.py
CAPACITY_SCOPES = ("microbatch", "sequence")  # the unit an expert buffer holds: routing/capacity.py
