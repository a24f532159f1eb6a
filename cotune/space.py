"""Search spaces: YAML files validated into a typed :class:`SearchSpace`.

A space names the workload and its fixed shape, how trials run and measure, the
objectives, the tunable knobs with their domains, the constraints between knobs
and a baseline config. Unknown keys are errors. ``load_space`` turns every
problem into a :class:`~cotune.errors.UserError` naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cotune import constraints
from cotune.config import KERNEL_IMPLS, KERNELS, PP_SCHEDULES, PRECISIONS
from cotune.errors import UserError


@dataclass(frozen=True)
class Knob:
    """A tunable value: which TrialConfig section it lands in, its type and its valid range."""

    section: str
    type: type
    low: float | None = None  # inclusive bounds of what the knob can mean at all
    high: float | None = None
    high_exclusive: bool = False
    values: tuple[Any, ...] | None = None  # the only valid values (strings)
    power_of_two: bool = False  # Triton tile sizes and warp counts
    tile_of: str | None = None  # a Triton tile knob of this kernel: sampled only when the kernel runs in Triton


KNOBS: dict[str, Knob] = {
    "micro_batch_size": Knob("batch", int, low=1),
    "global_batch_size": Knob("batch", int, low=1),
    "precision": Knob("precision", str, values=PRECISIONS),
    "learning_rate": Knob("optimizer", float, low=0, high=10, high_exclusive=False),
    "warmup_fraction": Knob("optimizer", float, low=0, high=1, high_exclusive=True),
    "weight_decay": Knob("optimizer", float, low=0, high=10),
    "adam_beta1": Knob("optimizer", float, low=0, high=1, high_exclusive=True),
    "adam_beta2": Knob("optimizer", float, low=0, high=1, high_exclusive=True),
    "grad_clip": Knob("optimizer", float, low=0),
    "activation_checkpointing": Knob("software", bool),
    "compile": Knob("software", bool),
    "world_size": Knob("parallel", int, low=1),
    "fsdp": Knob("parallel", int, low=1),
    "tp": Knob("parallel", int, low=1),
    "pp": Knob("parallel", int, low=1),
    "sequence_parallel": Knob("parallel", bool),
    "pp_schedule": Knob("parallel", str, values=PP_SCHEDULES),
    "pp_microbatches": Knob("parallel", int, low=1),
    "pp_virtual_stages": Knob("parallel", int, low=1),
    # Triton kernels (cotune.trial.kernels): `kernels` picks torch or triton for all three; a
    # per-kernel knob overrides it for one. Tiles are explicit values, never autotuned in a trial.
    "kernels": Knob("kernels", str, values=KERNEL_IMPLS),
    **{f"{k}_kernel": Knob("kernels", str, values=KERNEL_IMPLS) for k in KERNELS},
    **{f"mlp_{t}": Knob("kernels", int, low=1, power_of_two=True, tile_of="mlp")
       for t in ("block_m", "block_n", "block_k", "group_m")},
    "mlp_num_warps": Knob("kernels", int, low=1, high=32, power_of_two=True, tile_of="mlp"),
    "mlp_num_stages": Knob("kernels", int, low=1, high=8, tile_of="mlp"),
    "ce_block_size": Knob("kernels", int, low=1, power_of_two=True, tile_of="cross_entropy"),
    "ce_num_warps": Knob("kernels", int, low=1, high=32, power_of_two=True, tile_of="cross_entropy"),
    "ln_block_size": Knob("kernels", int, low=1, power_of_two=True, tile_of="layernorm"),
    "ln_num_warps": Knob("kernels", int, low=1, high=32, power_of_two=True, tile_of="layernorm"),
}
# Values computed from the knobs, never sampled; constraints may read them.
DERIVED = ("dp", "grad_accum_steps", "world_size")  # world_size is also a knob where a space tunes it

# Workload fields a constraint may read (for hf: models the shape is read off the model's config).
WORKLOAD_NAMES = {"n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "seq_len", "vocab_size", "model", "data",
                  "tokenizer"}

OBJECTIVES: dict[str, tuple[str, str]] = {
    # name: (metric key in TrialResult.metrics, direction)
    "tokens_per_second": ("tokens_per_second", "maximize"),
    "val_loss": ("val_loss", "minimize"),
    "peak_memory": ("peak_memory_bytes", "minimize"),
    # Training seconds to reach the study's target validation loss (cotune.time_to_loss).
    "time_to_loss": ("time_to_loss_s", "minimize"),
}
OBJECTIVE_ALIASES = {"throughput": "tokens_per_second", "loss": "val_loss", "memory": "peak_memory"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Domain(_Strict):
    """Either ``choices: [...]`` or ``low``/``high`` (with ``log``, ``step``)."""

    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> Domain:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty; give at least one value")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices has repeated values: {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give either choices: [...] or both low and high")
        if self.low > self.high:
            raise ValueError(f"low must be <= high, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log domain needs low > 0, but got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def fixed(self) -> bool:
        if self.choices is not None:
            return len(self.choices) == 1
        return self.low == self.high

    def values(self) -> list[Any]:
        """The finite values (choices, or the two ends of a range)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Constraint(_Strict):
    expr: str
    why: str = ""

    @field_validator("expr")
    @classmethod
    def _parses(cls, v: str) -> str:
        constraints.parse(v)
        return v


class HardwareSpec(_Strict):
    device: Literal["cpu", "cuda"] = "cpu"
    # Processes (GPUs, or CPU processes) one trial may use on each machine; None means all GPUs / 1 on CPU.
    nproc: int | None = Field(default=None, ge=1)
    # Machines a trial may span: a world_size above nproc runs on world_size / nproc of them, the search's
    # machine and node agents (`cotune node`) on the others.
    nnodes: int = Field(default=1, ge=1)


class WorkloadSpec(_Strict):
    """What a study trains: the model, its fixed shape, the data and the tokenizer.

    ``model: gpt`` (the built-in decoder) takes its shape from ``n_layer``, ``n_embd`` and
    ``n_head``; ``model: hf:<model_type>`` or ``hf:/local/dir`` takes the architecture's own
    config fields under ``config`` (``hidden_size``, ``num_hidden_layers``, ...); a user's
    ``package.module:function`` gets both, as the space gives them. The fields of a Hugging
    Face config are checked against the architecture when the search starts (that needs
    ``transformers``), not here.
    """

    model: str = "gpt"
    config: dict[str, Any] = {}
    n_layer: int | None = Field(default=None, ge=1)
    n_embd: int | None = Field(default=None, ge=1)
    n_head: int | None = Field(default=None, ge=1)
    seq_len: int = Field(ge=2)
    vocab_size: int | Literal["auto"] = "auto"  # auto: the tokenizer's (258 for bytes), or the .bin data's
    data: str = "builtin:stdlib-docstrings"
    data_field: str = "text"  # the text field of JSON Lines, Parquet and Arrow data
    tokenizer: str = "bytes"  # bytes | bpe:<vocab size> | a local tokenizer folder

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v == "gpt" or (v.startswith("hf:") and len(v) > 3) or _is_import_path(v):
            return v
        raise ValueError(
            f"{v!r} is not a model; valid: gpt, hf:<model_type> (e.g. hf:llama, hf:gpt2, hf:qwen2, hf:bert), "
            "hf:/path/to/local/dir, or package.module:function"
        )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v.startswith("bpe:"):
            size = v.removeprefix("bpe:")
            if not size.isdigit() or not 259 <= int(size) <= 2**32 - 1:
                raise ValueError(f"{v!r}: bpe:<vocab size> needs a whole vocabulary size of at least 259 "
                                 "(256 byte symbols and 3 special tokens), e.g. bpe:4096")
        elif not v:
            raise ValueError("give bytes, bpe:<vocab size> or a local tokenizer folder")
        return v

    @model_validator(mode="after")
    def _shape(self) -> WorkloadSpec:
        shape = {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head}
        if self.model == "gpt":
            missing = [k for k, v in shape.items() if v is None]
            if missing:
                raise ValueError(f"model gpt needs {', '.join(missing)} (its shape); "
                                 "e.g. n_layer: 2, n_embd: 64, n_head: 4")
            if self.config:
                raise ValueError("model gpt takes its shape from n_layer, n_embd and n_head, not from config; "
                                 "config is for hf: and package.module:function models")
        elif self.model.startswith("hf:"):
            given = [k for k, v in shape.items() if v is not None]
            if given:
                names = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads"}
                raise ValueError(f"{given[0]}: a Hugging Face model takes its shape from its own config fields; "
                                 f"give config: {{{names[given[0]]}: ...}} instead")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd % n_head == 0 must hold, but got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        return self


def _is_import_path(v: str) -> bool:
    module, sep, attr = v.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()


class TrialSpec(_Strict):
    warmup_steps: int = Field(default=3, ge=0)
    measured_steps: int = Field(default=10, ge=2)
    token_budget: int = Field(default=131072, ge=1)
    eval_tokens: int = Field(default=16384, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)


class SearchSpace(_Strict):
    name: str
    description: str = ""
    hardware: HardwareSpec = HardwareSpec()
    workload: WorkloadSpec
    trial: TrialSpec = TrialSpec()
    objectives: list[str] = ["tokens_per_second", "val_loss"]
    knobs: dict[str, Domain]
    constraints: list[Constraint] = []
    baseline: dict[str, Any] = {}
    # The validation loss the time_to_loss objective counts the time to; None: the baseline's.
    loss_target: float | None = Field(default=None, gt=0)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        v = [OBJECTIVE_ALIASES.get(o, o) for o in v]
        bad = [o for o in v if o not in OBJECTIVES]
        if bad:
            raise ValueError(f"unknown objective {bad[0]!r}; valid: {', '.join(OBJECTIVES)}")
        if not v or len(set(v)) != len(v):
            raise ValueError(f"objectives must be a non-empty list without repeats, got {v}")
        return v

    @field_validator("knobs", mode="before")
    @classmethod
    def _knob_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for name in v:
                if name not in KNOBS:
                    hint = " (dp is derived: world size / (fsdp * tp * pp))" if name == "dp" else ""
                    raise ValueError(f"unknown knob {name!r}{hint}; valid knobs: {', '.join(KNOBS)}")
        return v

    @field_validator("knobs")
    @classmethod
    def _knobs(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        for name, domain in v.items():
            check_domain(name, domain)
        return v

    @model_validator(mode="after")
    def _cross(self) -> SearchSpace:
        known = set(KNOBS) | set(DERIVED) | WORKLOAD_NAMES
        for c in self.constraints:
            unknown = sorted(constraints.names(c.expr) - known)
            if unknown:
                raise ValueError(
                    f"constraint {c.expr!r} reads unknown name(s) {unknown}; "
                    f"it may read knobs, {', '.join(DERIVED)} and workload fields"
                )
        world = self.knobs.get("world_size")
        nproc, nnodes = self.hardware.nproc, self.hardware.nnodes
        if world is not None and nproc is not None and max(world.values()) > nproc * nnodes:
            raise ValueError(
                f"knobs.world_size <= hardware.nproc * hardware.nnodes must hold, but got world_size up to "
                f"{max(world.values())}, nproc={nproc}, nnodes={nnodes}"
            )
        for name, value in self.baseline.items():
            if name not in KNOBS:
                raise ValueError(f"baseline: unknown knob {name!r}; valid: {', '.join(KNOBS)}")
            check_value(name, value)
        return self


def check_domain(name: str, domain: Domain) -> None:
    """Raise ``ValueError`` if ``domain`` is not valid for knob ``name``."""
    if name not in KNOBS:
        hint = " (dp is derived: world size / (fsdp * tp * pp))" if name == "dp" else ""
        raise ValueError(f"unknown knob {name!r}{hint}; valid knobs: {', '.join(KNOBS)}")
    knob = KNOBS[name]
    if domain.choices is None and knob.type in (str, bool):
        raise ValueError(f"knob {name!r} takes choices: [...], not a low/high range")
    if domain.choices is None and knob.type is int and (
        domain.low != int(domain.low) or domain.high != int(domain.high)
    ):
        raise ValueError(f"knob {name!r} is an integer, but got low={domain.low}, high={domain.high}")
    for value in domain.values():
        check_value(name, value)


def check_value(name: str, value: Any) -> None:
    knob = KNOBS[name]
    if knob.type is bool:
        ok = isinstance(value, bool)
    elif knob.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer()
        )
    elif knob.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"knob {name!r} takes {knob.type.__name__} values, got {value!r}")
    if knob.power_of_two and int(value) & (int(value) - 1):
        raise ValueError(f"knob {name!r}: {value!r} is not a power of two (Triton tiles and warp counts are)")
    if knob.values is not None and value not in knob.values:
        raise ValueError(f"knob {name!r}: {value!r} is not one of {', '.join(knob.values)}")
    if knob.low is not None and value < knob.low or (
        knob.high is not None and (value >= knob.high if knob.high_exclusive else value > knob.high)
    ):
        top = "" if knob.high is None else (f" and < {knob.high}" if knob.high_exclusive else f" and <= {knob.high}")
        raise ValueError(f"knob {name!r}: {value!r} is out of range (must be >= {knob.low}{top})")


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; any problem is a ``UserError`` naming file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such search-space file (see `cotune spaces` for the shipped ones)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the search-space file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a search space must be a YAML mapping with name, workload and knobs")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def spaces_dir() -> Path:
    """Where the shipped spaces live: the source checkout's ``search_spaces/``, else the wheel's copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "search_spaces", here / "_search_spaces"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no shipped search spaces next to {here}")


def shipped_spaces() -> list[Path]:
    return sorted(spaces_dir().glob("*.yaml"))


def default_space_path(gpu_count: int) -> Path:
    """The shipped space for the detected hardware: CPU, one GPU, or eight."""
    name = "cpu-tiny-gpt" if gpu_count == 0 else ("gpu-1-llama-1b" if gpu_count < 8 else "gpu-8-llama-8b")
    return spaces_dir() / f"{name}.yaml"
