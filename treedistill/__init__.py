"""treedistill: Monte-Carlo tree search over reasoning steps, distilled into a language model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
