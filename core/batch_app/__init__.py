"""vLLM Batch Server: an OpenAI-compatible Batch API on a durable PostgreSQL queue."""

__version__ = "0.1.0"
