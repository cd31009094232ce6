"""What each `nanochat` command does once Typer has parsed its options (main.py declares them).

    run.py      up (provision a node), train (plan and run the pipeline, stream it), logs (re-attach)
    manage.py   status (what runs and what it costs), pull (bring a run home), eval, down (stop spending)
"""
