"""Text: the tokenizer, chat templates, and the chat output parser."""
