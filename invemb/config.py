"""Configuration dataclasses and named presets.

A model is fully described by `ModelConfig` (encoder + decoder). `TrainConfig` holds the optimisation recipe.
Presets: `toy` (tiny random backbone, seconds on CPU, tests), `small` (MiniLM, CPU pipeline), `report-768`,
`report-2560` (the reference report's recipes, for a GPU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from invemb.errors import InvembError

POOLINGS = ("attention", "cls", "mean", "multiquery")
MEMORY_MODES = ("linear", "chunks")
DECODERS = ("transformer", "onepass", "gru")


@dataclass
class EncoderConfig:
    model_name: str = "all-MiniLM-L6-v2"  # alias, local folder or hub name (e.g. "finbert" -> ProsusAI/finbert)
    pooling: str = "attention"  # attention (the report's single query) | multiquery | cls | mean
    pool_queries: int = 16  # Q of multiquery pooling: Q queries, each pooled state projected to S/(Q+K) dims
    number_slots: int = 0  # K (multiquery): K more chunks, the k-th = the text's k-th piece that holds a digit
    token_identity: bool = False  # multiquery: the queries also pool the pieces' input embeddings (zero-initialised)
    sentence_dim: int = 768  # S, the width of the sentence vector
    freeze_backbone: bool = False
    max_length: int = 48  # tokens including [CLS]/[SEP]; longer texts are truncated with a warning
    random_init: bool = False  # build the backbone with random weights (tests / from-scratch training)
    backbone_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden_size": 32} with random_init


@dataclass
class DecoderConfig:
    kind: str = "transformer"  # transformer (autoregressive, cross-attention) | onepass | gru
    d_model: int = 384
    n_layers: int = 4
    n_heads: int = 6
    d_ff: int = 1536
    dropout: float = 0.1
    memory_slots: int = 4  # k vectors the sentence vector is mapped to (k=1 reproduces the report)
    tie_embeddings: bool = True
    memory_mode: str = "linear"  # linear: Linear(S, k*d) | chunks: the vector's k chunks of S/k dims, one per slot
    output_vocab: int = 0  # 0: the tokenizer's vocabulary; N: a compact vocabulary of N pieces (map in the weights)
    surface_heads: bool = False  # case + space-before tag heads: decoded text as written (invemb.surface)
    spell_numbers: bool = False  # targets write every number digit by digit ("587" -> "5 ##8 ##7"; invemb.surface)
    surface_hidden: int = 0  # surface heads: 0 one linear layer each; N: a GELU layer of N units before it
    surface_pieces: bool = False  # surface heads also read the embeddings of the piece read and the one before it
    surface_next: bool = False  # ... and of the piece after it (tagging runs after the search: the row is known)


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> "ModelConfig":
        e, d = self.encoder, self.decoder
        if e.pooling not in POOLINGS:
            raise InvembError(f"encoder.pooling must be one of {POOLINGS}, got {e.pooling!r}")
        if d.kind not in DECODERS:
            raise InvembError(f"decoder.kind must be one of {DECODERS}, got {d.kind!r}")
        from invemb.limits import MAX_MODEL_WIDTH, MAX_SEQUENCE, check_range
        check_range("encoder.max_length", e.max_length, 3, MAX_SEQUENCE)
        for name, value in (("encoder.sentence_dim", e.sentence_dim), ("decoder.d_model", d.d_model),
                            ("decoder.d_ff", d.d_ff)):
            check_range(name, value, 1, MAX_MODEL_WIDTH)
        check_range("decoder.n_layers", d.n_layers, 1, 64)
        check_range("decoder.n_heads", d.n_heads, 1, 256)
        check_range("decoder.memory_slots", d.memory_slots, 1, 1024)
        check_range("encoder.pool_queries", e.pool_queries, 1, 1024)
        check_range("encoder.number_slots", e.number_slots, 0, 64)
        if (e.number_slots or e.token_identity) and e.pooling != "multiquery":
            raise InvembError("encoder.number_slots / token_identity need encoder.pooling multiquery")
        if e.number_slots and d.memory_mode == "chunks" and d.memory_slots != e.pool_queries + e.number_slots:
            raise InvembError(f"memory_mode chunks with number_slots: decoder.memory_slots ({d.memory_slots}) must "
                              f"be pool_queries + number_slots ({e.pool_queries} + {e.number_slots}), one slot a chunk")
        check_range("decoder.output_vocab", d.output_vocab, 0, 10 ** 6)
        if not 0.0 <= d.dropout < 1.0:
            raise InvembError(f"decoder.dropout must be in [0, 1), got {d.dropout}")
        if d.d_model % d.n_heads:
            raise InvembError(f"decoder.d_model ({d.d_model}) must be divisible by n_heads ({d.n_heads})")
        if d.memory_mode not in MEMORY_MODES:
            raise InvembError(f"decoder.memory_mode must be one of {MEMORY_MODES}, got {d.memory_mode!r}")
        if d.memory_mode == "chunks" and e.sentence_dim % d.memory_slots:
            raise InvembError(f"memory_mode chunks: sentence_dim ({e.sentence_dim}) must be a multiple of "
                              f"memory_slots ({d.memory_slots})")
        if (d.surface_heads or d.spell_numbers) and d.kind != "transformer":
            raise InvembError("decoder.surface_heads / spell_numbers need decoder.kind transformer")
        if d.output_vocab and d.kind != "transformer":
            raise InvembError("a compact output vocabulary (decoder.output_vocab) needs decoder.kind transformer")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):  # e.g. a hand-edited config.json whose "invemb_model" is a string
            raise InvembError(f"config section model must be a mapping, got {type(d).__name__} {str(d)[:60]!r}")
        return cls(encoder=_build(EncoderConfig, d.get("encoder", {}), "encoder"),
                   decoder=_build(DecoderConfig, d.get("decoder", {}), "decoder")).validate()


@dataclass
class TrainConfig:
    preset: str = "small"
    epochs: int = 1
    max_steps: int = 0  # 0: no limit; otherwise stop after this many optimizer steps (the cosine horizon)
    max_minutes: float = 0.0  # > 0: also stop (validate, save, finish) after this many minutes of training in the
    # run (a resumed run counts the minutes before its checkpoint: invemb.training.schedule)
    fit_to_time: bool = False  # with max_minutes + cosine: the schedule's length follows the measured pace, so the
    # learning rate reaches min_lr at the deadline instead of being cut off mid-schedule
    batch_size: int = 128  # global batch (all ranks, before gradient accumulation)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    plateau_patience: int = 5
    plateau_factor: float = 0.1
    min_lr: float = 1e-5
    seed: int = 0  # draws the augmentations, the data order, dropout and noise
    split_seed: int = 0  # draws the train/validation split, apart from `seed`: a new seed never moves validation
    # headlines into training (a model continued with init_from must keep its split_seed)
    val_fraction: float = 0.1
    train_limit: int = 0  # 0: all training headlines; else the first N of the shuffled split
    val_limit: int = 512  # validation headlines evaluated each epoch (fixed subset)
    eval_every: int = 0  # steps between validations (0: once per epoch)
    save_every: int = 0  # steps between checkpoints (0: once per epoch)
    log_every: int = 10
    noise_sigma: float = 0.0  # N(0, sigma * rms(vector)) added to vectors during training
    sim_loss_weight: float = 0.0  # lambda of the sentence-similarity loss (0: off)
    gumbel_tau: float = 1.0
    sim_model: str = "all-MiniLM-L6-v2"  # paraphrase model of the similarity loss (must share the decoder vocab)
    paraphrase_file: str = ""  # JSONL {text, paraphrases}: enables the min-over-paraphrases loss
    bertscore_subset: int = 0  # val headlines scored with BERTScore at each validation (0: off)
    decode_subset: int = 0  # val headlines greedy-decoded at each validation: val_exact / val_bleu (0: off)
    bertscore_model: str = "all-mpnet-base-v2"  # scorer of invemb.metrics.bertscore_f1 (all-MiniLM-L6-v2: faster)
    deepspeed_config: str = ""  # path to a DeepSpeed JSON (train/ds_config/zero2.json); empty: plain PyTorch
    feature_cache: str = ""  # folder of the frozen backbone's cached token states (invemb.training.features); "": off
    bucket_batches: bool = False  # length-bucketed batches (rows of similar length together: less padding)
    sampled_softmax: int = 0  # > 0: training softmax over the batch's targets + this many random pieces (0: full)
    train_acc_rows: int = 0  # rows of each batch whose top-1/top-5 are logged (0: all; topk costs ~9% of a step)
    compact_vocab: bool = False  # decoder predicts only the training split's pieces (+ single characters)
    lr_schedule: str = "plateau"  # plateau (ReduceLROnPlateau on val top-1) | cosine (warm-up, cosine to min_lr)
    warmup_steps: int = 0  # linear warm-up of the cosine schedule
    init_from: str = ""  # start from the weights of a model folder (e.g. the shipped model), fresh optimizer
    holdout_newest_days: int = 0  # leave the newest N days of headlines (Time column) out of training
    word_dropout: float = 0.0  # share of decoder input tokens (after [CLS]) replaced by [MASK] during training
    augment_crops: int = 0  # word-span crops of each training headline added as training texts (invemb.data)
    crop_min_words: int = 3  # shortest crop, in words
    augment_splices: int = 0  # splices of each training headline with another (first words + another's last words)
    splice_rounds: int = 1  # independent draws of augment_splices per headline (round r: seed + r), cached apart
    augment_numbers: int = 0  # copies of each training headline holding a number, digits randomised (invemb.facts)
    augment_names: int = 0  # copies of each training headline holding a name, names swapped with other headlines'
    fact_rounds: int = 1  # independent draws of the number / name copies (round r: seed + 1000 + r)
    spell_practice: float = 0.0  # chance a piece of a capitalised training word is spelled in the targets (surface)
    surface_weight: float = 1.0  # weight of the case + space tag losses (decoder.surface_heads)
    # separation term (invemb.losses.separation_loss): each training row whose text has variants among the training
    # texts (same words, other digits / simple names: invemb.facts.variant_groups) is paired with one of them, drawn
    # per batch, and weight * max(0, margin - ||v(a) - v(b)|| / ||v(a)||) is added: a one-fact change must move the
    # vector at least `margin` (relative; the training noise moves it by noise_sigma on this scale)
    separation_weight: float = 0.0
    separation_margin: float = 0.5
    # the decoder's cross-entropy with the pieces of numbers and names (invemb.surface.decoder_targets' fact tags)
    # weighing fact_weight each, every other piece 1 (a weighted mean): a headline's facts are a few of its ~18
    # pieces, so in the plain mean they weigh little (1.0: the plain mean; needs the decoder's own targets)
    fact_weight: float = 1.0
    # "surface": only the case / space-before heads train; every other weight stays the start model's (so the pieces
    # it decodes, and every normalised figure, are the start model's)
    train_only: str = ""
    cpu_bf16: bool = False  # plain engine on a CPU with bf16 matmuls (AMX / AVX512-BF16): bf16 autocast; else fp32
    gpu_bf16: bool = True  # plain engine on a GPU with bf16: bf16 autocast (false: fp32, e.g. to match CPU numerics)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        base = preset(d.get("preset", "small"))
        model = d.pop("model", None)
        cfg = _build(cls, {**{k: v for k, v in dataclasses.asdict(base).items() if k != "model"}, **d}, "train")
        merged = base.model.to_dict()
        for part in ("encoder", "decoder"):
            merged[part].update((model or {}).get(part, {}))
        unknown = set(model or {}) - {"encoder", "decoder"}
        if unknown:
            raise InvembError(f"unknown config key(s) in model: {sorted(unknown)}")
        cfg.model = ModelConfig.from_dict(merged)
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise InvembError("batch_size and grad_accum must be >= 1")
        if cfg.lr_schedule not in ("plateau", "cosine"):
            raise InvembError(f"lr_schedule must be plateau or cosine, got {cfg.lr_schedule!r}")
        if not 0.0 <= cfg.word_dropout < 1.0:
            raise InvembError(f"word_dropout must be in [0, 1), got {cfg.word_dropout}")
        if cfg.augment_crops < 0 or cfg.crop_min_words < 1 or cfg.augment_splices < 0 or cfg.splice_rounds < 1:
            raise InvembError("augment_crops and augment_splices must be >= 0, crop_min_words and splice_rounds >= 1")
        if cfg.fit_to_time and (cfg.max_minutes <= 0 or cfg.lr_schedule != "cosine"):
            raise InvembError("fit_to_time fits the cosine schedule to max_minutes: it needs lr_schedule: cosine and "
                              f"max_minutes > 0 (got {cfg.lr_schedule!r}, {cfg.max_minutes})")
        if cfg.separation_weight < 0 or cfg.separation_margin <= 0:
            raise InvembError(f"separation_weight must be >= 0 and separation_margin > 0, got "
                              f"{cfg.separation_weight}, {cfg.separation_margin}")
        if cfg.fact_weight < 1:
            raise InvembError(f"fact_weight must be >= 1 (1: every piece weighs the same), got {cfg.fact_weight}")
        if cfg.train_only not in ("", "surface"):
            raise InvembError(f"train_only must be '' (everything) or 'surface', got {cfg.train_only!r}")
        if cfg.train_only == "surface" and not cfg.model.decoder.surface_heads:
            raise InvembError("train_only: surface needs model.decoder.surface_heads: true (the heads it trains)")
        if cfg.feature_cache and not cfg.model.encoder.freeze_backbone:
            raise InvembError("feature_cache needs model.encoder.freeze_backbone: true (a trained backbone changes)")
        return cfg


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise InvembError(f"config section {where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise InvembError(f"unknown config key(s) in {where}: {sorted(unknown)}; known: {sorted(fields)}")
    for name, value in values.items():  # strings for numbers, numbers for flags... are errors, not surprises
        ok = _TYPES.get(str(fields[name].type))
        if ok and (not isinstance(value, ok) or (bool not in ok and isinstance(value, bool))):
            raise InvembError(f"config {where}.{name} must be {fields[name].type}, got {value!r}")
    return cls(**values)


TOY_BACKBONE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 64}


def preset(name: str) -> TrainConfig:
    """Named recipes. `toy`: tiny random backbone for tests; `small`: MiniLM on CPU; `report-*`: the report."""
    if name == "toy":
        model = ModelConfig(
            EncoderConfig(sentence_dim=64, max_length=32, random_init=True, backbone_overrides=dict(TOY_BACKBONE)),
            DecoderConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0, memory_slots=4))
        return TrainConfig(preset=name, epochs=1, batch_size=16, lr=3e-3, val_limit=16, log_every=5, model=model)
    if name == "small":
        model = ModelConfig(EncoderConfig(sentence_dim=768, max_length=40, freeze_backbone=True),
                            DecoderConfig(d_model=256, n_layers=3, n_heads=4, d_ff=1024, dropout=0.1))
        return TrainConfig(preset=name, epochs=1, batch_size=64, lr=1e-3, train_limit=6000, val_limit=256,
                           model=model)
    if name in ("report-768", "report-2560"):
        s = int(name.split("-")[1])
        model = ModelConfig(EncoderConfig(sentence_dim=s, max_length=48),
                            DecoderConfig(d_model=512, n_layers=6, n_heads=8, d_ff=2048, memory_slots=4))
        return TrainConfig(preset=name, epochs=40, batch_size=128, lr=1e-4, val_limit=2048, bertscore_subset=256,
                           model=model)
    raise InvembError(f"unknown preset {name!r}; known: toy, small, report-768, report-2560")
