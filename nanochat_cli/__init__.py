"""nanochat_cli: the `nanochat` command that runs on your laptop.

    main.py           the Typer app: commands and options only (imports stay lazy: `--help` is instant)
    flows.py          up, train, logs          admin.py   status, pull, eval, down
    planner.py        dollars -> depth, tokens, hours, cost (throughput table, anchor CORE)
    cost.py           the cost meter (spent, projected, ETA, 80% warning) from progress events
    stream.py         live panel + reconnecting log reader
    state.py          clusters.json and run records under $NANOCHAT_HOME (atomic writes)
    local_backend.py  runs the pipeline as a detached process on this machine (`--local`)
    sky_backend.py    the SkyPilot adapter - the only module that imports `sky`
    pull.py           rsync + verification against MANIFEST.sha256
"""
