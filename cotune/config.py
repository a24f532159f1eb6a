"""TrialConfig and TrialResult: the one currency between the search side and the trial side.

A TrialConfig holds every knob's value *after* derivation (``grad_accum_steps``,
``dp``) plus the fixed workload shape and trial settings. It serialises to JSON; the
same JSON runs a trial by hand (``cotune trial cfg.json``) and is what export
translates. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")
KERNEL_IMPLS = ("torch", "triton")
KERNELS = ("mlp", "cross_entropy", "layernorm")  # the ops cotune has Triton kernels for
STATUSES = ("ok", "infeasible", "oom", "timeout", "crash", "diverged", "pruned")
# What a collective raises on a rank whose peer died (gloo; NCCL): such a rank's failure is its peer's.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote process exited")
TRAINING_OBJECTIVES = ("causal_lm", "masked_lm")  # what a workload trains on (not the search's objectives)


@dataclass(frozen=True)
class WorkloadConfig:
    """The model and data a trial trains: fixed for a whole study.

    ``model`` is ``gpt`` (the built-in decoder), ``hf:<model_type>`` (a Hugging Face
    architecture, random init), ``hf:/local/dir`` (a local config or checkpoint) or a
    user's ``package.module:function``. For all but ``gpt`` the shape fields below are
    read off the model the search built once before the first trial (``cotune.workload``),
    and ``config`` holds every field cotune passes to the model's config (the space's
    fields, then the vocabulary, positions, dropout and special-token ids it sets).
    """

    model: str = "gpt"  # gpt | hf:<model_type> | hf:/local/dir | package.module:function
    config: dict[str, Any] = field(default_factory=dict)  # the architecture's own config fields (hf:, user models)
    objective: str = "causal_lm"  # causal_lm (next token) | masked_lm (BERT family): what the model says it trains on
    n_layer: int = 2  # transformer layers
    n_embd: int = 64  # hidden size
    n_head: int = 4  # attention (query) heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: as many as n_head
    ffn_hidden: int | None = None  # MLP width; None: 4 * n_embd
    seq_len: int = 64
    vocab_size: int = 258  # the bytes tokenizer's: 256 bytes, end-of-text, mask
    data: str = "builtin:stdlib-docstrings"  # builtin, a text file or folder, JSON Lines, Parquet/Arrow, nanoGPT .bin
    data_field: str = "text"  # the text field of JSON Lines, Parquet and Arrow data
    tokenizer: str = "bytes"  # bytes | bpe:<vocab size> (trained on the training split) | a local tokenizer folder

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_width(self) -> int:
        return 4 * self.n_embd if self.ffn_hidden is None else self.ffn_hidden


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step, all ranks together
    grad_accum_steps: int = 1  # derived: global / (micro * data-parallel degree)


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees in torchtitan's naming: world = dp (replicate) * fsdp (shard) * tp * pp."""

    dp: int = 1  # replicated data parallel (DDP, or the replicate dim of HSDP when fsdp > 1)
    fsdp: int = 1  # fully sharded data parallel (FSDP2 fully_shard)
    tp: int = 1  # tensor parallel: attention heads and MLP width split across ranks
    pp: int = 1  # pipeline parallel: layers split into pp stages
    sequence_parallel: bool = False  # with tp > 1: LayerNorm/dropout regions sharded along the sequence
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b
    pp_microbatches: int = 1  # microbatches per pipeline step (>= pp for 1f1b schedules)
    pp_virtual_stages: int = 1  # stages per pipeline rank (> 1 only for interleaved1f1b)

    @property
    def world_size(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    @property
    def data_parallel(self) -> int:
        """Ranks that see different data (replicated and sharded together)."""
        return self.dp * self.fsdp


@dataclass(frozen=True)
class PrecisionConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 always trains with a dynamic loss scaler)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to 10% over the token budget."""

    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    grad_clip: float = 1.0


@dataclass(frozen=True)
class SoftwareConfig:
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """Which ops run as cotune's Triton kernels (``cotune.trial.kernels``) instead of PyTorch's, and their tiles.

    Tile sizes reach the kernels as these explicit values: nothing is autotuned inside a
    trial (it would search again and skew the timing). A kernel left to torch ignores its tiles.
    """

    mlp: str = "torch"  # torch | triton: the MLP's first matmul fused with its bias and GELU
    cross_entropy: str = "torch"  # torch | triton: loss and logits gradient in one pass over the vocabulary
    layernorm: str = "torch"  # torch | triton: every LayerNorm, forward and backward
    mlp_block_m: int = 64  # output tile rows (tokens)
    mlp_block_n: int = 64  # output tile columns (MLP width)
    mlp_block_k: int = 32  # reduction slice per loop iteration
    mlp_group_m: int = 8  # row tiles walked together, so the weight tiles they share stay in L2
    mlp_num_warps: int = 4
    mlp_num_stages: int = 3  # software-pipelined loads in flight (shared memory grows with it)
    ce_block_size: int = 1024  # vocabulary columns per loop iteration
    ce_num_warps: int = 8
    ln_block_size: int = 1024  # channels per loop iteration
    ln_num_warps: int = 4

    def selected(self) -> list[str]:
        """The kernels this config runs in Triton, in a fixed order."""
        return [k for k in KERNELS if getattr(self, k) == "triton"]


@dataclass(frozen=True)
class RunConfig:
    """How a trial runs and measures; fixed for a whole study."""

    device: str = "cpu"  # cpu | cuda
    warmup_steps: int = 3  # optimizer steps excluded from timing
    measured_steps: int = 10  # optimizer steps timed for throughput
    token_budget: int = 131072  # training tokens before the validation loss is taken
    eval_tokens: int = 16384  # held-out tokens for the validation loss
    timeout_s: float = 120.0
    seed: int = 0
    profile: bool = False  # add a torch.profiler pass after measuring
    # Shares of the token budget where the trial also takes a (shorter) validation loss and reports it
    # with its throughput and memory, so the search can stop it early; () reports nothing.
    rung_fractions: tuple[float, ...] = ()
    # Throughput and memory only: the warm-up and measured steps, then no more training and no validation
    # (a search that already knows this config's loss from an equivalent one; see cotune.factorise).
    measure_only: bool = False
    # Machines the trial's ranks span, world_size / nnodes processes on each: the search's machine runs the
    # first, node agents (``cotune node``) the others, met at a c10d rendezvous (cotune.nodes).
    nnodes: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rung_fractions", tuple(float(f) for f in self.rung_fractions))


@dataclass(frozen=True)
class TrialConfig:
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    software: SoftwareConfig = field(default_factory=SoftwareConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        """Build from ``to_dict`` output; unknown or missing sections and keys are errors."""
        return _from_dict(cls, data, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> TrialConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def budget_steps(self) -> int:
        """Optimizer steps to the token budget: ceil(token_budget / (global batch * seq_len)); the loss is taken then."""
        return math.ceil(self.run.token_budget / (self.batch.global_batch_size * self.workload.seq_len))

    def flat(self) -> dict[str, Any]:
        """Every tunable value by its knob name (``learning_rate``, ``dp``, ...), for tables."""
        out: dict[str, Any] = {}
        for section in (self.batch, self.parallel, self.precision, self.optimizer, self.software):
            out.update(dataclasses.asdict(section))
        for name, value in dataclasses.asdict(self.kernels).items():  # mlp -> mlp_kernel; tiles as they are
            out[f"{name}_kernel" if name in KERNELS else name] = value
        out["world_size"] = self.parallel.world_size
        return out


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    missing = sorted(set(fields) - set(data) - _ADDED_LATER)  # a config written before a key existed takes its default
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    values = {}
    for name in fields:
        if name not in data:
            continue
        sub = _SECTIONS.get(name) if cls is TrialConfig else None
        values[name] = _from_dict(sub, data[name], f"{where}.{name}") if sub else data[name]
    try:
        return cls(**values)
    except (TypeError, ArithmeticError) as e:  # a value of the wrong type, as the fields' checks meet it
        raise ValueError(f"{where}: {e}") from None


_ADDED_LATER = {"rung_fractions", "measure_only"}
_SECTIONS: dict[str, type] = {
    "workload": WorkloadConfig,
    "batch": BatchConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "optimizer": OptimizerConfig,
    "software": SoftwareConfig,
    "kernels": KernelConfig,
    "run": RunConfig,
}


@dataclass
class TrialResult:
    """What one trial produced. A failure is data: ``status`` says which kind.

    ``metrics`` keys (all present for ``ok``): tokens_per_second, val_loss,
    step_time_mean_s, step_time_std_s, peak_memory_bytes (anonymous on CPU, allocated on GPU),
    peak_memory_source, peak_rss_bytes (CPU) or peak_memory_reserved_bytes (GPU), mfu, peak_flops, peak_flops_source, flops_per_token, n_params, train_steps,
    tokens_trained, budget_steps. ``budget_steps`` = ceil(token_budget / (global
    batch * seq_len)), the steps before val_loss is taken; ``train_steps`` counts every
    step run (more than budget_steps when warm-up + measured steps need more);
    ``tokens_trained`` = budget_steps * global batch * seq_len, the tokens behind val_loss.
    ``phase_seconds`` splits the trial's wall time (start_and_import, data, model_build,
    warmup, measured, rest (the training steps after the timed window), rung_eval, eval, peak_flops,
    profile, ...).
    A ``pruned`` trial was stopped by the search at a rung: its metrics are the rung's
    (``rung_val_loss`` on the rung's shorter held-out set, no ``val_loss``) and ``rungs`` lists every rung reached.
    """

    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, tokens_seen, train_loss]
    phase_seconds: dict[str, float] = field(default_factory=dict)
    profile_top_ops: list[dict[str, Any]] = field(default_factory=list)
    kernel_timings: list[dict[str, Any]] = field(default_factory=list)  # each Triton kernel vs PyTorch, alone
    trace_path: str | None = None
    error_tail: str = ""  # last lines of the error, for failures
    reason: str = ""  # one sentence: why infeasible / diverged / timed out

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"trial result: unknown key(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write atomically, so a reader never sees half a result."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TrialResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def json_safe(value: Any) -> Any:
    """NaN/inf become strings ("nan", "inf") so the JSON is strict and Optuna storages accept it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def as_float(value: Any) -> float:
    """Inverse of the NaN/inf encoding above."""
    return float(value)
