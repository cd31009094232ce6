"""The stages of a training run, one file each, each a thin `main(argv)` over the library, runnable by hand
as `python -m nanochat_core.stages.<name>`. `pipeline.py` runs them in order as separate processes.
Rule: a stage imports the library and tasks, never another stage (tests/test_layers.py checks it)."""
