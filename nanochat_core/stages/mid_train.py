"""
Midtraining (the optional "mid" stage):  python -m nanochat_core.stages.mid_train --run-dir DIR [--source hub|local]

Between pre-training and SFT: the base model reads a large mixture of conversations so that it picks up
the chat format, multiple-choice answering (MMLU auxiliary_train), tool use (GSM8K with calculator calls),
its identity and spelling - at nearly the pre-training learning rate (--lr-frac 1.0), warm-started from
the base optimizer. The loop is SFT's (chat_training.train_conversations: best-fit packing with padding, loss on
assistant tokens only, checkpoints/resume/deadline/progress events); only the data and defaults differ.
The later nanochat folded this into SFT; we keep it because it is where most of the chat skill comes from
on a small budget.
"""
from __future__ import annotations

import argparse

from nanochat_core.training.chat_loop import add_common_args, check_args, train_conversations, with_user_data
from nanochat_core.common import run_main
from nanochat_core.tasks.common import TaskMixture
from nanochat_core.tasks.identity import Identity, shipped_chat
from nanochat_core.tasks.gsm8k import GSM8K
from nanochat_core.tasks.mmlu import MMLU
from nanochat_core.tasks.smoltalk import SmolTalk
from nanochat_core.tasks.spelling import SimpleSpelling, SpellingBee


def mid_mixture(source: str, seed: int = 42, custom_identity: bool = False):
    if source == "local":
        return shipped_chat(custom_identity)
    tasks = [SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("main", "train"), Identity(),
             SimpleSpelling(200_000, "train"), SpellingBee(80_000, "train")]
    epochs = [1, 1, 1, 0 if custom_identity else 2, 1, 1]   # --identity replaces the shipped one
    return TaskMixture(tasks, epochs=epochs, seed=seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.mid_train", description=__doc__.split("\n\n")[0])
    # ~850K conversations: pre-training's batch (2^19 tokens, 32 rows per GPU) gives several hundred steps
    add_common_args(p, lr_frac=1.0, gpu_rows=32, gpu_total_batch=2 ** 19)
    p.add_argument("--source", choices=["hub", "local"], default="hub",
                   help="hub: SmolTalk/MMLU-aux/GSM8K/identity/spelling; local: the shipped chat set (offline)")
    a = p.parse_args(argv)
    check_args(a)
    # your conversations and identity (--user-data): shares of (conversations, identity) per preset; the
    # local preset lets identity dominate so that a toy model learns its name within a minute
    data = with_user_data("mid", lambda custom=False: mid_mixture(a.source, a.seed, custom), a,
                          local_default_shares=(0.1, 0.2), cloud_default_shares=(0.01, 0.002))
    train_conversations("mid", data, a)


if __name__ == "__main__":
    run_main(main)
