"""Measuring the engine: eval against the real game, bench, record, and the metrics they share."""
