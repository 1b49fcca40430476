"""Adapters that run the algorithm cores: batching, the engine, the loop."""
