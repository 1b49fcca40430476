"""Model loading (any causal LM by name or path, LoRA) and the toy world's tiny Llama."""
