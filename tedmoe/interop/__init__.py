"""Exchange with other ecosystems: Hugging Face model directories (the Mixtral layout)."""
