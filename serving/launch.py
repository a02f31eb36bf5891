"""Start the REAL Triton Inference Server bundled in the `nvidia-pytriton` wheel (CPU) on a model repository.

    python serving/launch.py --repo model_repository            # runs until Ctrl-C

The entry point only: the CLI is invemb.serving.launch_cli; the server process, its supervisor (restarts) and
reaper are in invemb.serving.launch / supervise / procs (`TritonServer` is the library / test-fixture form).
"""
import sys

from invemb.serving.launch_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
