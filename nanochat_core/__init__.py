"""nanochat_core: the training stack that runs on the GPU node (and on a CPU at toy scale).
Never imports nanochat_cli, typer or sky: this package is what travels to the node.

Floors, lowest first (tests/test_layers.py checks that imports only point down this list):

    common.py     paths, errors, atomic writes, progress events, the distributed runtime
    tracking.py   Weights & Biases, when a key is set: one wandb run per training run
    run_spec.py   the run spec: one typed record of a run's money and shape, written once, read on the node
    node/         the machine a run lives on and its safety: device peaks, one writer per run dir, the
                  deadline's process-tree kill, several nodes sharing a run dir, the model-code sandbox
    data/         tokenizer · dataset (shards and sources) · dataloader (packing), plus the bundled corpus
    tasks/        data sets and their scorers (CORE, ARC, MMLU, GSM8K, HumanEval, spelling, SmolTalk, identity)
    gpt/          the model, its optimizer and its checkpoints
    inference/    engine (KV cache + calculator tool) · chat · serve (web chat + OpenAI API) · export (HF)
    training/     what every training stage shares: loop, stage_run, chat_loop (mid/SFT), preflight
    evaluation/   runners (task runners, ChatCORE) · report (report.md)
    stages/       one runnable file per pipeline stage; a stage never imports another
    bench/        `python -m nanochat_core.bench ...`: numbers, not tests
"""
__version__ = "0.1.0"
