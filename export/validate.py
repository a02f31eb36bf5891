"""Validate an ONNX export against its PyTorch checkpoint (graph parity, beam-search texts).

    python export/validate.py --checkpoint runs/small/final --onnx onnx/small [--data PATH] [-n 50]

The entry point only: the logic is in invemb.export.validate.
"""
import sys

from invemb.export.validate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
