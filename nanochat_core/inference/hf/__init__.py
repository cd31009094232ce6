"""Files `nanochat export` copies into a Hugging Face folder (configuration_nanochat.py, modeling_nanochat.py).
They import transformers, so nothing in nanochat imports them: export reads them as text."""
