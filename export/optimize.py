"""Optimised variants (opt, int8, fp16) of an ONNX export, with measured speed and quality.

    python export/optimize.py --onnx onnx/small [--variants opt,int8,fp16] [--report results/optimize_export.md]

The entry point only: the command is invemb.export.optimize_report, the variants invemb.export.optimize.
"""
import sys

from invemb.export.optimize_report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
