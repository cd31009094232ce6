"""Data sets and their scorers, one file per task; shared pieces (Task, TaskMixture, rendering) in common.py.

    core.py       the CORE benchmark (base models)      arc.py  mmlu.py  gsm8k.py  humaneval.py   chat evals
    smoltalk.py   the SFT conversations                 identity.py  who the assistant is (JSONL chats)
    spelling.py   spelling / letter counting            arithmetic.py   calculator-tool conversations
"""
