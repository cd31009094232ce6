"""nanochat_cli: the `nanochat` command that runs on your laptop.

    main.py       the Typer app: commands and options only (imports stay lazy: `--help` is instant)
    commands/     what each command does: run.py (up, train, logs) · manage.py (status, pull, eval, down)
    planning/     planner (dollars -> depth, tokens, hours, cost) · cost (the meter) · offers (GPU requests, ranks)
    backends/     where a job runs: base (the contract) · local (a process here) · skypilot (the only module that
                  imports sky) · sky_replies (its answers, read) · task_files (YAMLs + workdir) · bucket (bucket pulls)
    state.py      clusters.json and run records under $NANOCHAT_HOME (atomic writes)
    stream.py     the live panel and the reconnecting log reader
    pull.py       rsync + verification against MANIFEST.sha256
"""
