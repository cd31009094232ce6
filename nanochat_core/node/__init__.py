"""The machine a run lives on, and keeping it safe.

    datasheet.py   vendors' dense bf16 peaks (torch-free: the planner prices runs with them)
    device.py      this process's accelerator: peak FLOP/s for MFU, measured peaks, bandwidth, memory, FP8
    runlock.py     one writer per run directory; no stage outliving its pipeline
    proctree.py    the deadline kills a job's whole process tree
    shared_dir.py  several nodes, one run dir on a bucket mount: what it may and may not do
    lead_link.py   node 0 decides, the other nodes' pipelines follow
    sandbox.py     model-written code (HumanEval) run isolated by bubblewrap, with limits
"""
