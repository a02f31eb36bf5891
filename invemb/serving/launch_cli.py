"""The launcher CLI (`python serving/launch.py`): export the shipped model into an empty repository, start a
supervised Triton server (invemb.serving.launch.TritonServer), run until Ctrl-C / SIGTERM or until the supervisor
gives up on a crash loop (exit code 1, one line naming why)."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path

from invemb.serving.launch import ServerError, TritonServer
from invemb.serving.supervise import RestartPolicy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start the real Triton server of the nvidia-pytriton wheel (CPU) on a "
                                             "model repository, restarted when it crashes or a model stalls.")
    ap.add_argument("--repo", default="model_repository", help="Triton model repository")
    ap.add_argument("--http-port", type=int, default=None)
    ap.add_argument("--grpc-port", type=int, default=None)
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--log-file", default=None, help="server log (default: a temp file)")
    ap.add_argument("--server-dir", default=None, help="where the server folder is built (default: a cache dir)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    ap.add_argument("--quiet", action="store_true", help="do not echo the server log to stdout")
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--max-restarts", type=int, default=5,
                    help="restarts allowed within --restart-window seconds; one more failure ends the launcher")
    ap.add_argument("--restart-window", type=float, default=300.0)
    ap.add_argument("--hang-seconds", type=float, default=RestartPolicy.hang_s,
                    help="restart when a model finishes no request for this long while requests wait, or then "
                         "leaves a probe unanswered this long (0: no hang check)")
    ap.add_argument("--no-auto-export", action="store_true",
                    help="fail on a repository without model files instead of exporting the shipped model into it")
    args = ap.parse_args(argv)
    for name, value, low in (("--max-restarts", args.max_restarts, 0), ("--restart-window", args.restart_window, 1),
                             ("--timeout", args.timeout, 1), ("--hang-seconds", args.hang_seconds, 0)):
        if not value >= low:
            print(f"error: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    repo = Path(args.repo)
    if (repo / "tokenizer" / "config.pbtxt").is_file() and not (repo / "tokenizer" / "1" / "manifest.json").is_file():
        if args.no_auto_export:
            print(f"error: {repo} holds no exported model: run `python export/to_onnx.py [--checkpoint CKPT] "
                  f"--triton-repo {repo}` first", file=sys.stderr)
            return 2
        # the default: serve the shipped model (models/), exported into this repository first
        from invemb.paths import checkout_root
        print(f"{repo} holds no exported model: exporting the shipped model into it (export/to_onnx.py)", flush=True)
        rc = subprocess.run([sys.executable, "-m", "invemb.export.exporter",
                             "--out", str(checkout_root() / "onnx/shipped"), "--triton-repo", str(repo)]).returncode
        if rc != 0:
            return rc
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window, hang_s=args.hang_seconds)
    try:
        server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, log_file=args.log_file, echo=not args.quiet,
                              startup_timeout=args.timeout, server_dir=args.server_dir, log_verbose=args.log_verbose,
                              policy=policy)
        server.start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nTriton ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}  "
          f"log {server.log_file}  (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.failed is None:
            stop.wait(1.0)
    finally:
        server.stop()
    if server.failed is not None:
        print(f"error: the server kept failing, not restarted again: {server.failed} (log: {server.log_file})",
              file=sys.stderr)
        return 1
    return 0
