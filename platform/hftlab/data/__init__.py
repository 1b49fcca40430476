"""Records, loaders, the toy world, fine-tuning mixes and the prompt template."""
