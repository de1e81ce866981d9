"""Split a LLaMA checkpoint into pipeline stages, tune a soft prompt through them, generate."""
