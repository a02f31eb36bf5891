"""Train an InvertibleEmbedder from a YAML recipe: plain PyTorch (one process) or DeepSpeed ZeRO 0-3.

    python train/run.py --config train/configs/toy.yaml --data ../shared/data/financial-news-headlines
    deepspeed --num_gpus 2 train/run.py --config train/configs/toy.yaml deepspeed_config=train/ds_config/zero2.json

The entry point only: arguments, recipes, engines and the loop are in invemb.training (run.py's docstring has
every option). Nothing heavy is imported before main() sets OMP_NUM_THREADS for DeepSpeed ranks.
"""
import sys

from invemb.training.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
