"""Two interchangeable training engines: plain PyTorch (one process) and DeepSpeed (ZeRO 0-3, any world size).

Both own the client torch AdamW (no DeepSpeed FusedAdam/cpu_adam JIT builds) and a ReduceLROnPlateau on it,
and expose the same calls: forward / train_micro_batch / step_plateau / save / load / consolidated_state_dict.
Checkpoint layout (both): <ckpt_dir>/latest (tag), <ckpt_dir>/<tag>/invemb_state.json (loop position, written
BEFORE the weights so that `latest` never points at a tag without it) + the engine's files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from invemb.config import TrainConfig
from invemb.errors import InvembError
from invemb.paths import resolve_path
from invemb.util import read_json

STATE_FILE = "invemb_state.json"


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; (0, 0, 1) for a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_bf16_available() -> bool:
    """Whether this CPU multiplies bf16 natively (Intel AMX or AVX512-BF16; oneDNN uses them under autocast).
    Without them bf16 autocast is emulated and slower than fp32, so it is never switched on there."""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_bf16(cfg: TrainConfig, device_type: str) -> bool:
    """Whether the plain engine runs its steps under bf16 autocast: on a GPU with bf16 unless the recipe says
    gpu_bf16: false (fp32, e.g. to train with the CPU's numerics), on a CPU only with native bf16 and cpu_bf16."""
    if device_type == "cuda":
        return bool(cfg.gpu_bf16 and bf16_available())
    return bool(cfg.cpu_bf16 and cpu_bf16_available())


def load_ds_config(cfg: TrainConfig, world: int) -> dict:
    """Read the DeepSpeed JSON and fill batch/accumulation/clipping/bf16 from the recipe (the one source of truth).

    A numeric value that disagrees with the recipe is an error: set it in the YAML instead."""
    p = resolve_path(cfg.deepspeed_config)
    ds = read_json(p, "deepspeed_config")
    if not isinstance(ds, dict):
        raise InvembError(f"deepspeed_config {p}: a JSON object expected")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise InvembError(f"{p}: remove '{key}': the recipe's client AdamW + ReduceLROnPlateau are used")
    want = {"train_micro_batch_size_per_gpu": cfg.batch_size // world, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum, "gradient_clipping": cfg.grad_clip}
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise InvembError(f"{p}: {key}={ds[key]} disagrees with the recipe ({value}); use 'auto' and set "
                              "batch_size / grad_accum / grad_clip in the YAML")
        ds[key] = value
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_available()
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise InvembError(f"{p}: fp16 is not supported on CPU; use bf16 'auto'")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("zero_optimization", {"stage": 0})
    return ds


def read_state(ckpt_dir: Path) -> tuple[str, dict] | None:
    """(tag, loop state) of the latest complete checkpoint, or None."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    f = ckpt_dir / tag / STATE_FILE
    if not f.is_file():
        raise InvembError(f"checkpoint {ckpt_dir / tag} is incomplete ({STATE_FILE} missing)")
    return tag, json.loads(f.read_text())


def prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted((d for d in ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("step_")),
                  key=lambda d: int(d.name.split("_")[1]))
    for d in tags[:-keep]:
        if d.name != current:
            shutil.rmtree(d, ignore_errors=True)


def _optimizer(module: torch.nn.Module, cfg: TrainConfig):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    return opt, sched


class EngineBase:
    """What both engines share: the learning rate, the plateau scheduler, collectives and the loop-state file."""
    rank, world, stage = 0, 1, 0
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step_plateau(self, metric: float) -> None:
        self.scheduler.step(metric)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, fields: dict[str, float]) -> dict[str, float]:
        """Each named value summed over the ranks (one all-reduce of a float64 vector in the dict's key order:
        every rank builds the dict the same way); the names come back with their sums."""
        t = torch.tensor(list(fields.values()), dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return dict(zip(fields, t.tolist()))

    def _write_state(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        if self.rank == 0:
            (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
            state = {**state, "scheduler": self.scheduler.state_dict(), "lr": self.lr}
            tmp = ckpt_dir / tag / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.rename(ckpt_dir / tag / STATE_FILE)
        self.barrier()

    def _restore_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.set_lr(state["lr"])


class PlainEngine(EngineBase):
    """One process: torch AdamW + grad clipping + accumulation; bf16 autocast on a GPU that has it (unless the
    recipe says gpu_bf16: false), and on a CPU with native bf16 matmuls when the recipe asks (cpu_bf16); the weights
    and the optimizer stay fp32."""

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig):
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device)
        self.optimizer, self.scheduler = _optimizer(module, cfg)
        self.bf16 = autocast_bf16(cfg, self.device.type)
        self.micro = 0

    def forward(self, **batch) -> dict:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(**batch)

    def train_micro_batch(self, **batch) -> dict:
        out = self.forward(**batch)
        (out["loss"] / self.cfg.grad_accum).backward()
        self.micro += 1
        if self.micro % self.cfg.grad_accum == 0:
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        from safetensors.torch import save_model
        self._write_state(ckpt_dir, tag, state)
        save_model(self.module, str(ckpt_dir / tag / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), ckpt_dir / tag / "optimizer.pt")
        (ckpt_dir / "latest").write_text(tag)

    def load(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        from safetensors.torch import load_model
        load_model(self.module, str(ckpt_dir / tag / "model.safetensors"), device=str(self.device))
        self.optimizer.load_state_dict(torch.load(ckpt_dir / tag / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))  # tensors + plain values: no pickle code
        self._restore_state(state)

    def consolidated_state_dict(self, ckpt_dir: Path, tag: str) -> dict | None:
        return self.module.model.state_dict()

    def full_model(self):
        """The InvertibleEmbedder with full fp32 weights on rank 0 (for decoding); None on other ranks."""
        return self.module.model


class DeepSpeedEngine(EngineBase):
    """deepspeed.initialize around the client AdamW; the plateau scheduler stays outside (stepped on validation)."""

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig, ds_config: dict, model_factory):
        import deepspeed
        self.cfg, self.ds_config, self.model_factory = cfg, ds_config, model_factory
        self.rank, _, self.world = world_info()
        self.stage = int(ds_config["zero_optimization"].get("stage", 0))
        self.bf16 = bool(ds_config["bf16"]["enabled"])
        opt, self.scheduler = _optimizer(module, cfg)
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config)
        self.optimizer = opt  # the client optimizer: its param_groups are the ones ZeRO steps with
        self.module, self.device = self.engine.module, self.engine.device

    def forward(self, **batch) -> dict:
        return self.engine(**batch)

    def train_micro_batch(self, **batch) -> dict:
        out = self.engine(**batch)
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        self._write_state(ckpt_dir, tag, state)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag)  # writes `latest` last
        self.barrier()

    def load(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise InvembError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        self._restore_state(state)

    def consolidated_state_dict(self, ckpt_dir: Path, tag: str) -> dict | None:
        """fp32 weights of the InvertibleEmbedder on rank 0 (ZeRO shards consolidated from the saved tag)."""
        self.barrier()
        if self.rank != 0:
            return None
        if self.stage == 0:
            sd = self.module.state_dict()
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k[len("model."):]: v.float() for k, v in sd.items() if k.startswith("model.")}

    def full_model(self):
        """A full-precision copy of the model on rank 0 (collective under ZeRO-3); None on other ranks."""
        if self.stage < 3 and not self.bf16:
            return self.module.model if self.rank == 0 else None
        import deepspeed
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            if self.rank != 0:
                return None
            sd = {k: v.detach().float().clone() for k, v in self.module.model.state_dict().items()}
        copy = self.model_factory()
        copy.load_state_dict(sd)
        return copy.to(self.device)


def init_distributed() -> None:
    """Rank env defaults for a single process outside a launcher, then DeepSpeed's init (gloo on CPU)."""
    import deepspeed
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from invemb.util import free_port
        os.environ["MASTER_PORT"] = str(free_port())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    _remove_shm_at_exit(ds_shm_buffer(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]))


def ds_shm_buffer(addr: str, port: str | int, rank: str | int) -> str:
    """The /dev/shm region of a rank's CPU allreduce (DeepSpeed ops/csrc/cpu/comm/shm.cpp names it
    deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>; DeepSpeed never unlinks it: ~66 MB per
    rank and run stay in RAM until reboot)."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _remove_shm_at_exit(name: str) -> None:
    """Unlink this rank's region when the process ends: normal exit, an exception, or SIGTERM (what the deepspeed
    launcher sends the other ranks when one fails). The other ranks opened it at init, so their mappings stay valid
    until they exit. Only SIGKILL leaves it behind."""
    import atexit
    import signal
    import sys

    def remove() -> None:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    atexit.register(remove)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run atexit, then exit 143
