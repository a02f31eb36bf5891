"""Training: `train/run.py` (invemb.training.run) drives the engines (plain PyTorch / DeepSpeed), the loop, the
run outputs; the frozen backbone's feature cache, shipping a run to models/, paraphrase generation."""
