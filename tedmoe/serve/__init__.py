"""The OpenAI-compatible HTTP server in front of the inference engine (``tedmoe serve``)."""
