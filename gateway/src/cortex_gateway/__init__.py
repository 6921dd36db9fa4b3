"""cortex-gateway: an OpenAI-compatible gateway for vLLM and llama.cpp servers."""

__version__ = "0.1.0"
