"""sidecar: a metering proxy for OpenAI-compatible LLM engines."""

__version__ = "0.1.0"
