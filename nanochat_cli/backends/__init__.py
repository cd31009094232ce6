"""Where a run's job runs. One contract, two backends, so the commands never ask which they hold.

    base.py         the Backend contract (launch, job state, tail with an opaque cursor, pull, down, cost)
    local.py        the pipeline as a detached process on this machine (`--local`)
    skypilot.py     SkyPilot: offers, launch, managed jobs, tail, status, down - the only module importing sky
    sky_replies.py  SkyPilot's answers turned into ours: job states, one-line errors, managed-job prices
    task_files.py   the task YAMLs (sky/) and the workdir a task ships to the node
    bucket.py       pulling a run from a bucket with the cloud's own Python library
"""
