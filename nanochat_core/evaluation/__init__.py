"""Measuring a model and writing it down.

    runners.py   categorical and generative task runners, ChatCORE (used by the eval and post-training stages)
    report.py    report.md, rebuilt from what the stages left on disk
"""
