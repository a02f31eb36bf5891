"""The training loop behind train/run.py (invemb.training.run): deterministic data order, validation,
checkpoints, final export.

Data order: epoch e shuffles the training rows with random.Random(seed + e); global batch i (batch_size rows) is
split across ranks, rank r taking rows [r*micro, (r+1)*micro); an optimizer step consumes grad_accum global
batches. The global RNG is re-seeded from (seed, epoch, batch, rank) before each micro-batch, so dropout, noise
and Gumbel samples are the same whether or not a run was interrupted: a resumed run skips the consumed batches
and continues exactly where the checkpoint was taken, on the same learning-rate schedule and time budget (the
fitted cosine end and the minutes spent are in the checkpoint state: invemb.training.schedule). run.py refuses to
resume on other training texts (invemb.training.resume) unless --allow-data-change.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from invemb.config import TrainConfig
from invemb.metrics import TopKAccumulator
from invemb.paths import resolve_path
from invemb.text import IGNORE
from invemb.training.engine import DeepSpeedEngine, PlainEngine, init_distributed, prune, world_info
from invemb.training.run_outputs import RunLogger, examples_table, git_hash, make_plots, read_metrics
from invemb.training.schedule import Schedule
from invemb.training.ship import record_init_info
from invemb.training.targets import add_surface, freeze_for, paraphrase_tensors, training_targets

KEEP_CHECKPOINTS = 2
N_EXAMPLES = 12


def accuracy_fields(acc: TopKAccumulator) -> dict[str, float]:
    """Top-k hit counts and the scored-token count as named fields ("top1_hits", ..., "scored_tokens")."""
    return {**{f"top{k}_hits": float(h) for k, h in zip(acc.ks, acc.hits)}, "scored_tokens": float(acc.total)}


@dataclass
class TrainWindow:
    """Training outputs between two log lines, summed over micro-batches (then over ranks by `sums`)."""
    t0: float = field(default_factory=time.time)  # wall clock of the window's start (reset after val / saves)
    micro_batches: int = 0
    loss: float = 0.0
    ce: float = 0.0
    sim: float = 0.0
    para: float = 0.0
    surface: float = 0.0
    sep: float = 0.0
    pairs: int = 0  # rows paired with a one-fact variant (the separation term)
    tokens: int = 0  # decoder input tokens (labels + the [CLS] of each row)
    samples: int = 0
    acc: TopKAccumulator = field(default_factory=lambda: TopKAccumulator((1, 5)))

    def sums(self) -> dict[str, float]:
        """The summable fields by name (what `EngineBase.all_sum` reduces over ranks)."""
        return {"micro_batches": self.micro_batches, "loss": self.loss, "ce": self.ce, "sim": self.sim,
                "para": self.para, "surface": self.surface, "sep": self.sep, "pairs": self.pairs,
                "tokens": self.tokens, "samples": self.samples, **accuracy_fields(self.acc)}


def _seed(*parts: int) -> None:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % (2 ** 62)
    torch.manual_seed(s)


class Trainer:
    def __init__(self, cfg: TrainConfig, args, out: Path, ds_config: dict | None, train: list[str], val: list[str],
                 paraphrases: dict[str, list[str]] | None, resume, vocab_ids=None, cache_groups=None, data=None):
        self.cfg, self.args, self.out, self.ds_config = cfg, args, out, ds_config
        self.train_texts, self.val_texts, self.paraphrases, self.resume = train, val, paraphrases, resume
        self.vocab_ids = vocab_ids  # compact output vocabulary (tokenizer ids) of a fresh model, or None
        self.cache_groups = cache_groups or [train + val]  # the feature cache's groups of texts (cached apart)
        self.data = data  # the training texts' fingerprint + data facts (invemb.training.resume), kept in checkpoints

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from invemb.losses import Objective, SentenceSimilarityLoss
        from invemb.model import InvertibleEmbedder
        cfg = self.cfg
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if self.ds_config is not None:
            init_distributed()
        self.rank, _, self.world = world_info()
        self.main = self.rank == 0
        self.micro = cfg.batch_size // self.world
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (self.out / "git.txt").write_text(git_hash() + "\n")
            if self.ds_config is not None:
                (self.out / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        torch.manual_seed(cfg.seed)
        if cfg.init_from:  # continue from a model folder (the shipped model): weights, compact vocabulary
            model = InvertibleEmbedder.from_pretrained(resolve_path(cfg.init_from))
            model.config = cfg.model  # the recipe's (equal up to dropout-like settings, checked by run.py)
            record_init_info(self.out, cfg.init_from, self.main)
        else:
            model = InvertibleEmbedder(cfg.model)
            if self.vocab_ids is not None:
                model.decoder.set_vocab(self.vocab_ids, model.tokenizer.unk_token_id)
        add_surface(model, cfg, self.train_texts, self.out, self.main)
        freeze_for(model, cfg)
        self.features = self._feature_cache(model) if cfg.feature_cache else None
        self.factory = lambda: self._fresh_model(model)  # noqa: E731
        self.params_total = sum(p.numel() for p in model.parameters())
        self.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        enc = model.tokenize(self.train_texts)
        self.train_ids, self.train_mask = enc["input_ids"], enc["attention_mask"]  # [N,L]
        self.train_lengths = self.train_mask.sum(1).tolist()
        enc = model.tokenize(self.val_texts)
        self.val_ids, self.val_mask = enc["input_ids"], enc["attention_mask"]  # [M,L]
        # the decoder's own sequences + surface tags (invemb.surface), or None: the encoder's ids
        self.train_tgt, self.val_tgt = training_targets(model, cfg, self.train_texts, self.val_texts)
        if self.features is not None:  # each row's row in the cache
            index = {t: i for i, t in enumerate(t for g in self.cache_groups for t in g)}
            self.train_cache_rows = [index[t] for t in self.train_texts]
            self.val_cache_rows = [index[t] for t in self.val_texts]
        self.variant_of: dict[int, list[int]] = {}  # training row -> the rows of its variant group (separation term)
        if cfg.separation_weight > 0:
            from invemb.facts import variant_groups
            for g in variant_groups(self.train_texts):
                for r in g:
                    self.variant_of[r] = g
            if self.main:
                print(f"separation term: {len(self.variant_of)} of {len(self.train_texts)} training texts have a "
                      f"one-fact variant (weight {cfg.separation_weight}, margin {cfg.separation_margin})", flush=True)
        self.para_index = None
        if self.paraphrases:
            self.para_ids, self.para_mask, self.para_index = paraphrase_tensors(model, self.train_texts,
                                                                                self.paraphrases)
        sim = (SentenceSimilarityLoss(model.tokenizer, cfg.sim_model, cfg.gumbel_tau)
               if cfg.sim_loss_weight > 0 else None)
        objective = Objective(model, cfg.noise_sigma, cfg.sim_loss_weight, sim, cfg.sampled_softmax, cfg.word_dropout,
                              cfg.surface_weight, cfg.separation_weight, cfg.separation_margin, cfg.fact_weight)
        if self.ds_config is not None:
            self.eng = DeepSpeedEngine(objective, cfg, self.ds_config, self.factory)
        else:
            self.eng = PlainEngine(objective, cfg)
        self.device = self.eng.device
        if sim is not None:
            sim.to(self.device)
        self.ckpt_dir = self.out / "checkpoints"
        self.step, self.epoch, self.batch_pos, self.last_saved = 0, 0, 0, -1
        if self.resume:
            tag, state = self.resume
            self.eng.load(self.ckpt_dir, tag, state)
            self.step, self.epoch, self.batch_pos = state["step"], state["epoch"], state["batch"]
            self.last_saved = self.step
        self.prior_wall, self.prior_cpu = self._prior_time()
        self.logger = RunLogger(self.out, self.main, self.step if self.resume else None)

    def _prior_time(self) -> tuple[float, float]:
        """Training wall / CPU seconds spent before this process (from the resumed checkpoint), for the CPU-hour
        count of a model's card. A checkpoint from before these fields: its log's last elapsed_s, CPU = wall x
        threads."""
        if not self.resume:
            return 0.0, 0.0
        state = self.resume[1]
        if "wall_total_s" in state:
            return float(state["wall_total_s"]), float(state["cpu_total_s"])
        recs = [r for r in read_metrics(self.out / "metrics.jsonl") if r["kind"] == "train"
                and r["step"] <= state["step"]]
        wall = float(recs[-1].get("elapsed_s", 0.0)) if recs else 0.0
        return wall, wall * torch.get_num_threads()

    def _time_totals(self) -> dict:
        return {"wall_total_s": self.prior_wall + time.time() - self.t_start,
                "cpu_total_s": self.prior_cpu + time.process_time() - self.cpu_start}

    def _feature_cache(self, model):
        """Open (rank 0 builds them first if missing) the frozen backbone's token-state caches of self.cache_groups."""
        from invemb.training.features import ConcatCache
        enc = self.cfg.model.encoder
        args = (resolve_path(self.cfg.feature_cache), model.encoder, model.tokenizer, self.cache_groups,
                enc.model_name, enc.max_length)
        if self.main:
            cache = ConcatCache.open_or_build(*args)
        if self.ds_config is not None and self.world > 1:
            torch.distributed.barrier()
        return cache if self.main else ConcatCache.open_or_build(*args)

    def _fresh_model(self, like):
        from transformers import AutoModel
        from invemb.model import InvertibleEmbedder
        return InvertibleEmbedder(self.cfg.model, like.tokenizer, AutoModel.from_config(like.encoder.backbone.config))

    # ------------------------------------------------------------------------------------------------ batches
    def _batch(self, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], training: bool,
               cache_rows: list[int] | None = None, tgt: dict | None = None) -> dict:
        rows_t = torch.tensor(rows, dtype=torch.long)
        m = mask[rows_t]
        length = int(m.sum(1).max())
        batch = {"input_ids": ids[rows_t, :length].to(self.device), "attention_mask": m[:, :length].to(self.device)}
        if tgt is not None:  # the decoder's sequences and tags (numpy int32/int8 [N,T']) of these rows
            tm = torch.from_numpy(tgt["mask"][rows]).long()  # [b,T']
            t = int(tm.sum(1).max())
            batch.update(target_ids=torch.from_numpy(tgt["ids"][rows, :t]).long().to(self.device),
                         target_mask=tm[:, :t].to(self.device),
                         case_tags=torch.from_numpy(tgt["case"][rows, :t]).long().to(self.device),
                         space_tags=torch.from_numpy(tgt["space"][rows, :t]).long().to(self.device))
            if training and self.cfg.fact_weight != 1:
                batch["fact_tags"] = torch.from_numpy(tgt["fact"][rows, :t]).long().to(self.device)
        if self.features is not None and cache_rows is not None:  # cached backbone states [b,length,H]
            batch["hidden_states"] = self.features.states([cache_rows[r] for r in rows], length).to(self.device)
        if training and self.variant_of:  # the separation term's pairs and the paraphrase rows: training only
            batch.update(self._pairs(ids, mask, rows, cache_rows))
        if training and self.para_index is not None:
            pidx = self.para_index[rows_t]  # [b,P]
            valid = pidx >= 0
            pm = self.para_mask[pidx.clamp(min=0)] * valid.unsqueeze(-1)  # [b,P,L']
            plen = max(2, int(pm.sum(-1).max()))
            batch.update(para_ids=self.para_ids[pidx.clamp(min=0)][..., :plen].to(self.device),
                         para_mask=pm[..., :plen].to(self.device), para_valid=valid.to(self.device))
        return batch

    def _pairs(self, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], cache_rows: list[int] | None) -> dict:
        """The separation term's pairs of a training batch: each row with variants gets one of them, drawn with
        torch's generator (seeded per micro-batch by the loop, so a resumed run draws the same)."""
        of, partner = [], []
        for i, r in enumerate(rows):
            g = self.variant_of.get(r)
            if g:
                j = int(torch.randint(len(g) - 1, ()))
                of.append(i)
                partner.append(g[j] if g[j] != r else g[-1])  # uniform over the group less r
        if not of:
            return {}
        p = torch.tensor(partner, dtype=torch.long)
        pm = mask[p]
        length = int(pm.sum(1).max())
        out = {"pair_of": torch.tensor(of, dtype=torch.long).to(self.device),
               "pair_ids": ids[p, :length].to(self.device), "pair_mask": pm[:, :length].to(self.device)}
        if self.features is not None and cache_rows is not None:
            out["pair_hidden_states"] = self.features.states([cache_rows[r] for r in partner], length).to(self.device)
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.train_texts)))
        random.Random(self.cfg.seed + epoch).shuffle(order)
        b = self.cfg.batch_size
        n = (len(order) // b) // self.cfg.grad_accum * self.cfg.grad_accum
        order = order[:n * b]
        if self.cfg.bucket_batches:  # sort windows of 50 batches by length, cut, shuffle the batches (seeded)
            w = 50 * b
            order = [i for s in range(0, len(order), w)
                     for i in sorted(order[s:s + w], key=lambda r: self.train_lengths[r])]
            batches = [order[i * b:(i + 1) * b] for i in range(n)]
            random.Random(self.cfg.seed + epoch + 7919).shuffle(batches)
            return batches
        return [order[i * b:(i + 1) * b] for i in range(n)]

    # ------------------------------------------------------------------------------------------------ loop
    def run(self) -> None:
        from tqdm.auto import tqdm
        self.setup()
        cfg, eng = self.cfg, self.eng
        per_epoch = len(self.train_texts) // cfg.batch_size // cfg.grad_accum
        # the cosine's end + the time budget, continued from the resumed checkpoint's state (invemb.training.schedule)
        sched = self.schedule = Schedule(cfg, min(cfg.max_steps or 10 ** 12, cfg.epochs * per_epoch),
                                         self.resume[1] if self.resume else None)
        stop_at = self.args.stop_after_steps
        bar = tqdm(total=sched.total, initial=self.step, disable=not self.main, unit="step", dynamic_ncols=True)
        self.t_start, self.cpu_start = time.time(), time.process_time()
        sched.start(self.step)
        window = TrainWindow()
        self._train(True)
        while self.step < sched.total and self.epoch < cfg.epochs:
            batches = self._epoch_batches(self.epoch)
            for bi in range(self.batch_pos, len(batches)):
                _seed(cfg.seed, self.epoch, bi, self.rank)
                rows = batches[bi][self.rank * self.micro:(self.rank + 1) * self.micro]
                if cfg.lr_schedule == "cosine" and bi % cfg.grad_accum == 0:
                    eng.set_lr(sched.lr_at(self.step))
                out = eng.train_micro_batch(**self._batch(self.train_ids, self.train_mask, rows, True,
                                                          getattr(self, "train_cache_rows", None), self.train_tgt))
                self._accumulate(window, out)
                if (bi + 1) % cfg.grad_accum:
                    continue
                self.step += 1
                bar.update(1)
                if sched.after_step(self.step):  # fit_to_time re-fitted the cosine's end
                    bar.total = sched.total
                epoch_end, last = bi + 1 == len(batches), self.step >= sched.total or sched.out_of_time()
                if self.step % cfg.log_every == 0 or last:
                    self._log_train(window, bar)
                    window = TrainWindow()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or epoch_end or last:
                    self._validate(bar)
                    window.t0 = time.time()
                position = (self.epoch + 1, 0) if epoch_end else (self.epoch, bi + 1)
                if (cfg.save_every and self.step % cfg.save_every == 0) or epoch_end or last or self.step == stop_at:
                    self._save(*position)
                    window.t0 = time.time()
                if self.step == stop_at:
                    bar.close()
                    if self.main:
                        print(f"stopped after {stop_at} steps (--stop-after-steps); resume with --resume")
                    self.logger.close()
                    return
                if last:
                    break
            else:  # the epoch's batches ran out without a `break`: next epoch, from its first batch
                self.epoch, self.batch_pos = self.epoch + 1, 0
                continue
            break  # the inner loop broke (last step, out of time): leave the epoch loop too
        bar.close()
        self._finish()

    def _train(self, mode: bool) -> None:
        (self.eng.engine if isinstance(self.eng, DeepSpeedEngine) else self.eng.module).train(mode)

    def _accumulate(self, w: TrainWindow, out: dict) -> None:
        w.micro_batches += 1
        w.loss += float(out["loss"].detach())
        w.ce += float(out["ce"].detach())
        w.sim += float(out["sim"].detach())
        w.para += float(out["para"].detach())
        w.surface += float(out["surface"]) if "surface" in out else 0.0
        w.sep += float(out["sep"]) if "sep" in out else 0.0
        w.pairs += int(out.get("pairs", 0))
        labels = out["labels"]  # [b,T-1]
        w.tokens += int((labels != IGNORE).sum()) + labels.shape[0]  # + the [CLS] input of each row
        w.samples += labels.shape[0]
        rows = self.cfg.train_acc_rows or labels.shape[0]  # topk over the vocabulary is not free
        with torch.no_grad():
            w.acc.update(out["logits"][:rows].detach(), labels[:rows])

    def _log_train(self, w: TrainWindow, bar) -> None:
        s = self.eng.all_sum(w.sums())
        n, dt = max(1.0, s["micro_batches"]), max(1e-9, time.time() - w.t0)
        scored = max(1.0, s["scored_tokens"])
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch, "loss": s["loss"] / n, "ce": s["ce"] / n,
               "sim": s["sim"] / n, "para": s["para"] / n, "surface": s["surface"] / n, "sep": s["sep"] / n,
               "paired": s["pairs"] / max(1.0, s["samples"]), "lr": self.eng.lr,
               "top1": s["top1_hits"] / scored, "top5": s["top5_hits"] / scored,
               "tokens_per_s": s["tokens"] / dt, "samples_per_s": s["samples"] / dt,
               "elapsed_s": time.time() - self.t_start, **self._time_totals()}
        self.logger.log(rec)
        if self.main:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['top1']:.3f}", lr=f"{rec['lr']:.1e}",
                            tok_s=f"{rec['tokens_per_s']:.0f}")

    # ------------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self, bar=None) -> dict:
        cfg, eng = self.cfg, self.eng
        self._train(False)
        acc, loss_sum, surface_sum = TopKAccumulator((1, 5)), 0.0, 0.0
        g = self.micro * self.world
        for start in range(0, len(self.val_texts), g):
            rows = list(range(start, min(start + g, len(self.val_texts))))
            local = rows[self.rank * self.micro:(self.rank + 1) * self.micro]
            out = eng.forward(**self._batch(self.val_ids, self.val_mask, local or rows[:1], False,
                                            getattr(self, "val_cache_rows", None), self.val_tgt))
            if local:  # every rank runs the same number of forwards (ZeRO-3 gathers are collective)
                acc.update(out["logits"].float(), out["labels"])
                loss_sum += float(out["ce"]) * int((out["labels"] != IGNORE).sum())
                surface_sum += float(out.get("surface", 0.0)) * len(local)
        s = eng.all_sum({"loss_sum": loss_sum, "surface_sum": surface_sum, **accuracy_fields(acc)})
        scored = max(1.0, s["scored_tokens"])
        rec = {"kind": "val", "step": self.step, "epoch": self.epoch, "val_loss": s["loss_sum"] / scored,
               "val_top1": s["top1_hits"] / scored, "val_top5": s["top5_hits"] / scored,
               "val_surface": s["surface_sum"] / max(1, len(self.val_texts)),
               **self._time_totals()}
        if cfg.bertscore_subset > 0:
            rec.update(self._bertscore(cfg.bertscore_subset))
        if cfg.decode_subset > 0:
            rec.update(self._decode_metrics(cfg.decode_subset))
        if cfg.lr_schedule == "plateau":
            eng.step_plateau(rec["val_top1"])
        rec["lr"] = eng.lr
        self.logger.log(rec)
        if self.main and bar is not None:
            bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        self._train(True)
        self.last_val = rec
        return rec

    def _decode_metrics(self, n: int) -> dict:
        """Greedy exact match and BLEU of the first n validation headlines (the curve a user cares about)."""
        from invemb.metrics import bleu, exact_match
        model = self.eng.full_model()  # collective under ZeRO-3
        res = {}
        if self.main:
            texts = self.val_texts[:n]
            hyps, refs = model.decode(model.encode(texts), beam_size=1), model.reference_texts(texts)
            res = {"val_greedy_exact": exact_match(hyps, refs), "val_greedy_bleu": bleu(hyps, refs)}
        self.eng.barrier()
        return res

    def _bertscore(self, n: int) -> dict:
        from invemb.metrics import bertscore_f1
        model = self.eng.full_model()  # collective under ZeRO-3
        res = {}
        if self.main:
            for name, texts in (("val", self.val_texts[:n]), ("train", self.train_texts[:n])):
                hyps = model.decode(model.encode(texts), beam_size=1)
                res[f"{name}_bertscore"] = bertscore_f1(hyps, model.reference_texts(texts), self.cfg.bertscore_model)
        self.eng.barrier()
        return res

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save(self, epoch: int, batch: int) -> None:
        if self.last_saved == self.step:
            return
        tag = f"step_{self.step:08d}"
        state = {"step": self.step, "epoch": epoch, "batch": batch, "world_size": self.world,
                 "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum, "seed": self.cfg.seed,
                 "engine": "deepspeed" if self.ds_config is not None else "plain", "zero_stage": self.eng.stage,
                 "train_headlines": len(self.train_texts), "device": self.device.type, **self._time_totals(),
                 **self.schedule.state(), "data": self.data, "recipe_file": str(getattr(self.args, "config", "")),
                 "bf16": bool(getattr(self.eng, "bf16", False))}
        if self.device.type == "cuda":  # the model card names the GPU of a GPU run (its wall hours = GPU hours)
            state["accelerator"] = torch.cuda.get_device_name(self.device)
        self.eng.save(self.ckpt_dir, tag, state)
        if self.main:
            prune(self.ckpt_dir, KEEP_CHECKPOINTS, tag)
        self.last_saved = self.step

    def _finish(self) -> None:
        from invemb.model import InvertibleEmbedder
        tag = (self.ckpt_dir / "latest").read_text().strip()
        sd = self.eng.consolidated_state_dict(self.ckpt_dir, tag)
        if self.main:
            model = self.factory()
            if getattr(model.decoder, "has_surface", False):
                from invemb.surface import load_table
                model.surface_table = load_table(self.out) or {}
            missing, _ = model.load_state_dict(sd, strict=False)
            if missing:
                raise RuntimeError(f"consolidated checkpoint {tag} lacks {sorted(missing)[:5]}")
            final = model.save_pretrained(self.out / "final")
            model = InvertibleEmbedder.from_pretrained(final, device=self.device)
            examples_table(model, self.val_texts[:N_EXAMPLES], self.out / "examples.md")
            plots = make_plots(self.out / "metrics.jsonl", self.out / "plots", self.cfg.bertscore_model)
            vals = [r for r in read_metrics(self.out / "metrics.jsonl") if r["kind"] == "val"]
            summary = {"final_val": vals[-1] if vals else None, "steps": self.step,
                       "wall_s_this_process": time.time() - self.t_start,
                       "engine": "deepspeed" if self.ds_config is not None else "plain", "zero_stage": self.eng.stage,
                       "world_size": self.world, "bf16": bool(getattr(self.eng, "bf16", False)),
                       "params_total": self.params_total, "params_trainable": self.params_trainable,
                       "train_headlines": len(self.train_texts), "val_headlines": len(self.val_texts),
                       "git": git_hash(), "final": str(final), "plots": [p.name for p in plots]}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"done: {self.step} steps; final weights in {final}; val {vals[-1] if vals else {}}")
        self.eng.barrier()
        self.logger.close()
