"""Simulated twins of the node's adapters (``actors/io``), run in virtual time."""
