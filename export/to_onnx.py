"""Export an invemb checkpoint to ONNX graphs + manifest.json + tokenizer (+ a Triton model repository).

    python export/to_onnx.py --checkpoint runs/small/final --out onnx/small [--triton-repo model_repository]

The entry point only: the logic is in invemb.export.exporter.
"""
import sys

from invemb.export.exporter import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
