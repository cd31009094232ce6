"""The model, its optimizer and its checkpoints.

    model_config.py  GPTConfig, the one dial config_for_depth, exact parameter counts and FLOPs (no torch: the
                     CLI's planner imports it)
    model.py         the GPT itself: attention with sliding windows, value embeddings, smear, backout
    muon.py          MuonAdamW: Muon (Polar Express, NorMuon, MuonEq) for matrices, AdamW for the rest
    quantize.py      inference weights in fp32, bf16, int8 (per row) or int4 (groups of 32), and `--dtype auto`
    cpu_kernels.py   the C kernels of CPU decode (cpu_kernels.c): int8/int4 matrix-vector products, one layer's
                     attention step, RMS norm; compiled once per machine, torch's path where they cannot be
    checkpoint.py    atomic, verified, resumable checkpoints of both (single node and bucket-shared run dirs)
"""
