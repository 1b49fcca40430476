"""Generation backends behind the `Generator` protocol (base.py): `hf.py` (CPU/GPU) and `vllm.py` (vLLM)."""
