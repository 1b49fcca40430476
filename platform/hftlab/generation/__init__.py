"""Generation backends: `hf.py` (CPU/GPU); a vLLM backend implements the same `Generator` interface."""
