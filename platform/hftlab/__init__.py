"""hftlab: experiments on harmful fine-tuning of LLMs and the defenses against it."""

from hftlab.allocator import keep_freed_memory

__version__ = "0.1.0"

keep_freed_memory()  # in every process that imports hftlab: the driver, Ray actors and Train workers
