"""Training helpers that live in the installed package (the loop itself is driven by train/run.py)."""
