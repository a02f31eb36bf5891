"""Generate paraphrases of training headlines for the min-over-paraphrases loss (TrainConfig.paraphrase_file).

    python scripts/make_paraphrases.py --data ../shared/data/financial-news-headlines --out runs/paraphrases.jsonl \
        --limit 2000

The entry point only: generators, sampling and the resumable JSONL output are in invemb.training.paraphrases.
"""
import sys

from invemb.training.paraphrases import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
