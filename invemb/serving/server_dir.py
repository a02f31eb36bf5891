"""The server folder built from the `nvidia-pytriton` wheel, and the environment tritonserver runs in.

The wheel holds tritonserver 2.51, the python backend (+ stubs per Python version), caches and the shared
libraries; it has NO onnxruntime backend. `build_server_dir` lays out a server folder:
    bin/tritonserver, caches/, lib -> nvidia_pytriton.libs (the binary's RPATH is $ORIGIN/../lib),
    backends/python/{libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub (this Python)},
    backends/onnxruntime/model.py  (our Python-based ONNX Runtime backend, invemb/serving/onnxruntime_backend.py)
The stub must run THIS interpreter's libpython (LD_LIBRARY_PATH gets sysconfig LIBDIR) and find this venv's
packages (PATH starts with this venv's bin).
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ORT_BACKEND = Path(__file__).resolve().parent / "onnxruntime_backend.py"  # installed as backends/onnxruntime/model.py


class ServerError(RuntimeError):
    """The server could not be built, started or reached; the message carries the log tail."""


def _wheel_paths() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the Triton server comes from the pip package nvidia-pytriton==0.7.0 "
                          "(pip install 'invemb[serve]')") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServerError(f"no tritonserver binary under {root} (or no {libs}): reinstall nvidia-pytriton")
    return root, libs


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_server_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = "".join(c if c.isalnum() else "_" for c in sys.prefix)[-60:]
    return cache / "invemb" / f"tritonserver-py{_python_tag()}-{venv}"


def build_server_dir(dest: str | os.PathLike | None = None) -> Path:
    """Create (once, atomically) the server folder from the wheel; always refresh the ORT backend's model.py."""
    root, libs = _wheel_paths()
    dest = Path(dest) if dest else default_server_dir()
    stub = root / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {_python_tag()} ({stub})")
    marker = dest / ".complete"
    if not marker.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            shutil.copytree(root / "bin", tmp / "bin")  # copied: $ORIGIN would resolve a symlink to the wheel
            shutil.copytree(root / "caches", tmp / "caches")
            py = tmp / "backends" / "python"
            py.mkdir(parents=True)
            for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
                shutil.copy2(root / "backends" / "python" / name, py / name)
            shutil.copy2(stub, py / "triton_python_backend_stub")
            (tmp / "lib").symlink_to(libs, target_is_directory=True)
            (tmp / ".complete").write_text(f"{root}\n")
            try:
                tmp.rename(dest)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    ort = dest / "backends" / "onnxruntime"
    ort.mkdir(parents=True, exist_ok=True)
    tmp_file = ort / f".model.py.{os.getpid()}"
    shutil.copy2(ORT_BACKEND, tmp_file)
    os.replace(tmp_file, ort / "model.py")
    return dest


def server_env(server_dir: Path, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(server_dir / "lib"), libdir,
                                                          env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env
