"""Test helpers that are also useful by hand: :mod:`xrdscale.testing.cluster` (a cluster in a box)."""
