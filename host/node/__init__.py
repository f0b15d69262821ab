"""The node: a plugin manager wired onto the bus, and the host functions that reach the bus."""
