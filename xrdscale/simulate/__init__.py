"""Simulated beamtimes: phases from crystal structures, the pattern model, a battery phantom and its scan."""
