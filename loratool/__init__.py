"""loratool: model surgery and LoRA adapter management."""

__version__ = "0.1.0"
