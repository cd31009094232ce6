"""The machine a run lives on, and keeping it safe.

    device.py      datasheet bf16 peaks (the planner prices with them), measured peaks, peak memory, FP8
    runlock.py     one writer per run directory; no stage outliving its pipeline
    proctree.py    the deadline kills a job's whole process tree
    shared_dir.py  several nodes, one run dir on a bucket mount: what it may and may not do
    lead_link.py   node 0 decides, the other nodes' pipelines follow
    sandbox.py     model-written code (HumanEval) run isolated by bubblewrap, with limits
"""
