"""Speculative decoding on decode and mixed workers: drafts (ngram.py, eagle_*.py) verified in one
target forward pass per step (spec_step.py), accepted by sampling from the target (verify.py)."""
