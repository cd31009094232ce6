"""The stages of a training run, one file each, each a thin `main(argv)` over the library, runnable by hand
as `python -m nanochat_core.stages.<name>`. Rule: a stage never imports another stage (tests/test_layers.py).

    pipeline.py    runs the others in order, each a resumable process, within the run's deadline
    tok_train.py   trains the BPE tokenizer        base_train.py   pre-training
    mid_train.py   midtraining (chat format, tools) chat_sft.py     supervised fine-tuning
    chat_rl.py     RL on GSM8K (optional)          base_eval.py    CORE + bpb     chat_eval.py   the chat evals
"""
