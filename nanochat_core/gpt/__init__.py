"""The model, its optimizer and its checkpoints.

    model_config.py  GPTConfig, the one dial config_for_depth, exact parameter counts and FLOPs (no torch: the
                     CLI's planner imports it)
    model.py         the GPT itself: attention with sliding windows, value embeddings, smear, backout
    muon.py          MuonAdamW: Muon (Polar Express, NorMuon, MuonEq) for matrices, AdamW for the rest
    quantize.py      inference weights in fp32, bf16 or int8 (weight-only, per row), and `--dtype auto`
    checkpoint.py    atomic, verified, resumable checkpoints of both (single node and bucket-shared run dirs)
"""
