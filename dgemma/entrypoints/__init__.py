"""Entry points: the Python API (`LLM`), the command line and the OpenAI-compatible server."""
