"""Build TensorRT engines from an ONNX export (GPU + NVIDIA TensorRT only).

    python export/to_tensorrt.py --onnx onnx/small --out trt/small [--fp16]

The entry point only: the logic is in invemb.export.tensorrt_build.
"""
import sys

from invemb.export.tensorrt_build import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
