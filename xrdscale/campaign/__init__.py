"""Campaigns: the spec, the job store, the stage table and the resumable runner."""
