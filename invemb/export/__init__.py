"""Export: ONNX graphs + manifest.json + tokenizer (`exporter`), the parity validator (`validate`), optimised
variants (`optimize`) and TensorRT engines (`tensorrt_build`). The contract they write is invemb.manifest.
The scripts export/to_onnx.py, validate.py, optimize.py and to_tensorrt.py are the entry points."""
