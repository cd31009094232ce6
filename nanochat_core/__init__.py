"""nanochat_core: the training stack that runs on the GPU node (and on a CPU at toy scale).
Never imports nanochat_cli, typer or sky: this package is what travels to the node."""
__version__ = "0.1.0"
