"""dgemma: a local inference engine for DiffusionGemma block-diffusion language models."""

from dgemma.api import LLM, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]
