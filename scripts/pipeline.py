"""The main job in one command: [train ->] evaluate -> export -> serve -> roundtrip, in one run folder.

    .venv/bin/python scripts/pipeline.py --data ../shared/data/financial-news-headlines     # the shipped model
    .venv/bin/invemb pipeline --data ...                                                    # the same

The entry point only: stages and options are in invemb.pipeline.
"""
import sys

from invemb.pipeline import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
