"""hftlab: experiments on harmful fine-tuning of LLMs and the defenses against it."""

__version__ = "0.1.0"
