"""Structured output: constraints through llguidance, JSON Schema details, tool-call grammars."""
