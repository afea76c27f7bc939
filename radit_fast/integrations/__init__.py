"""Drop-in integrations with the training libraries people already use (Hugging Face, sentence-transformers)."""
