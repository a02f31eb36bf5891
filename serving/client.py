"""gRPC client for the invemb Triton models: encode texts -> .npy, decode .npy -> texts, roundtrip texts.

    python serving/client.py --url 127.0.0.1:8001 encode headlines.txt --out vecs.npy
    python serving/client.py decode vecs.npy --out texts.txt                       # server-side beam_search
    python serving/client.py decode vecs.npy --mode client --export onnx/small      # beam search here
    python serving/client.py decode vecs.npy --normalized     # lower-cased WordPiece text, not as written
    python serving/client.py roundtrip headlines.txt [--mode client --export onnx/small]

The entry point only: `TritonClient` is in invemb.serving.client, the CLI in invemb.serving.client_cli.
"""
import sys

from invemb.serving.client_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
