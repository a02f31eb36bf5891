"""Training at scale: `train/run.py` (plain PyTorch or DeepSpeed), its engines, loop and run outputs."""
