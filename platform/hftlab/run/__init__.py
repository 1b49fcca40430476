"""One run of the pipeline: its inputs, its stages (train, evaluate), distilled refusals, the judge's evaluation."""
