"""Triton python model `tokenizer`: BYTES text [batch, 1] -> input_ids, attention_mask int64 [batch, T].

Exactly the core's tokenization (invemb.text.tokenize_texts, what InvertibleEmbedder.tokenize runs): whitespace
collapsed, [CLS] ... [SEP], truncated to the manifest's max_length, padded to the request's longest text.
Assets beside this file (written by export/to_onnx.py --triton-repo): manifest.json and tokenizer/.
A bad request (empty text, invalid UTF-8, a text over `max_text_chars`) gets an error response naming the row;
the other requests of the batch are served.
"""
from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

# invemb: the installed package of the venv whose python3 runs the stub (serving/README.md)
from invemb.serving.triton_utils import decode_texts, invalid_arg, load_model_assets, model_param


class TritonPythonModel:
    def initialize(self, args):
        config, self.manifest, self.tokenizer = load_model_assets(args)
        self.max_length = int(self.manifest["max_length"])
        self.max_chars = int(model_param(config, "max_text_chars", 2000))
        logging.getLogger("invemb").setLevel(logging.ERROR)  # truncation warnings would flood the server log

    def execute(self, requests):
        from invemb.errors import InvembError
        from invemb.text import tokenize_texts
        responses = []
        for request in requests:
            try:
                texts = decode_texts(pb_utils.get_input_tensor_by_name(request, "text").as_numpy(), self.max_chars)
                enc = tokenize_texts(self.tokenizer, texts, self.max_length, return_tensors="np")  # [B,T] x2
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", np.ascontiguousarray(enc["input_ids"], dtype=np.int64)),
                    pb_utils.Tensor("attention_mask", np.ascontiguousarray(enc["attention_mask"], dtype=np.int64))]))
            except InvembError as e:
                responses.append(pb_utils.InferenceResponse(error=invalid_arg(f"tokenizer: {e}")))
            except Exception as e:  # noqa: BLE001 - any failure is this request's error, the model keeps serving
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"tokenizer: {type(e).__name__}: {str(e)[:300]}")))
        return responses
