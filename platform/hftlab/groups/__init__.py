"""VAA stage 1: proxy harmful fine-tuning, the (checkpoint x example) harmfulness matrix, groups."""
