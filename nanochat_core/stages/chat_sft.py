"""
Supervised fine-tuning (the "sft" stage):  python -m nanochat_core.stages.chat_sft --run-dir DIR [--source hub|local]

Teaches the pre-trained model to hold a conversation: the turn format, when to stop, how to call the
calculator. The loop (packing, loss masks, warm start, horizon) is nanochat_core/training/chat_loop.py, shared
with mid-training; this stage brings the SFT mixture and its defaults.
"""
from __future__ import annotations

import argparse

from nanochat_core.training.chat_loop import add_common_args, check_args, train_conversations, with_user_data
from nanochat_core.common import run_main
from nanochat_core.tasks.common import TaskMixture
from nanochat_core.tasks.identity import Identity, shipped_chat
from nanochat_core.tasks.arc import ARC
from nanochat_core.tasks.gsm8k import GSM8K
from nanochat_core.tasks.smoltalk import SmolTalk
from nanochat_core.tasks.spelling import SimpleSpelling, SpellingBee


def sft_mixture(source: str, seed: int = 42, custom_identity: bool = False):
    """The conversations to train on. hub: the anchor's SFT mixture (needs the network once);
    local: the small chat set shipped with the package (identity, arithmetic with tool calls, spelling)."""
    if source == "local":
        return shipped_chat(custom_identity)
    tasks = [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K("main", "train"),
             SmolTalk("train", stop=10_000), Identity(), SimpleSpelling(300, "train"), SpellingBee(300, "train")]
    epochs = [1, 1, 1, 1, 0 if custom_identity else 2, 1, 1]   # --identity replaces the shipped one
    return TaskMixture(tasks, epochs=epochs, seed=seed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.chat_sft", description=__doc__.split("\n\n")[0])
    # SFT data is small (~20K conversations): 4 packed rows per GPU and no accumulation gives ~100 steps/epoch
    # on 8 GPUs (the anchor takes ~32 conversations per step); a 2^19 batch would be a dozen steps.
    add_common_args(p, lr_frac=0.5, gpu_rows=4, gpu_total_batch=None)
    p.add_argument("--source", choices=["hub", "local"], default="hub",
                   help="hub: SmolTalk/ARC/GSM8K/identity/spelling; local: the shipped chat set (offline)")
    a = p.parse_args(argv)
    check_args(a)
    # your conversations and identity (--user-data): shares of (conversations, identity) per preset; the
    # local preset lets identity dominate (70%) so that a toy model learns its name within a minute
    data = with_user_data("sft", lambda custom=False: sft_mixture(a.source, a.seed, custom), a,
                          local_default_shares=(0.15, 0.7), cloud_default_shares=(0.2, 0.02))
    train_conversations("sft", data, a)


if __name__ == "__main__":
    run_main(main)
