"""Datasets and evaluations for post-training: one file per task, shared pieces in common.py."""
