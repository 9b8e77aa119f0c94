"""Task-specific data helpers (puzzle generators, text formats, small tokenizers) for fine-tuning."""
