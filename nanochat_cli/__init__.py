"""nanochat_cli: the `nanochat` command that runs on your laptop."""
