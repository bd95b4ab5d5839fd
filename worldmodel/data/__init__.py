"""Data: collecting gameplay into sharded datasets, reading and verifying them, recordings (video + actions)."""
