"""From sampled knob values to a TrialConfig, and whether it may be launched.

Optuna is asked only for values that can run, and what it records is exactly what ran:
the parallel degrees are one ``layout`` choice among the layouts that tile the world
size and that the model can take (``dp = world_size / (fsdp * tp * pp)``); the micro
batch is a choice among the values that divide the global batch per data-parallel rank
(``grad_accum_steps = global / (micro * dp * fsdp)``); pipeline knobs are asked only
with a pipeline, sequence parallel only with tp, tiles only for a kernel in Triton.
Where a valid set of choices depends on another knob, the parameter's name says on
what (``layout|world_size=2``, ``micro_batch_size|rank_batch=16``): Optuna's
conditional parameters. What cannot be made structural is a YAML constraint or a
layout rule, checked here before launch.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import replace
from typing import Any

from cotune import constraints, tiles
from cotune.config import (
    KERNELS,
    BatchConfig,
    KernelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    SoftwareConfig,
    TrialConfig,
    WorkloadConfig,
)
from cotune.space import KNOBS, Domain, SearchSpace
from cotune.workload import WorkloadInfo
from cotune.workload import describe as describe_workload

# Values a knob takes when the space does not mention it.
DEFAULTS: dict[str, Any] = {
    "micro_batch_size": 8,
    "global_batch_size": 8,
    "precision": "fp32",
    "learning_rate": 1e-3,
    "warmup_fraction": 0.05,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "grad_clip": 1.0,
    "activation_checkpointing": False,
    "compile": False,
    "fsdp": 1,
    "tp": 1,
    "pp": 1,
    "sequence_parallel": False,
    "pp_schedule": "1f1b",
    "pp_microbatches": 1,
    "pp_virtual_stages": 1,
    "kernels": "torch",
    # A per-kernel choice left out follows `kernels`; a tile left out is KernelConfig's default,
    # cut to the power of two that covers its dimension (so it is never wider than the data).
    **{f"{k}_kernel": None for k in KERNELS},
}


def allowed_domain(name: str, domain: Domain, native_precisions: list[str]) -> Domain:
    """The domain narrowed to what this hardware runs (only precision is hardware-bound)."""
    if name != "precision":
        return domain
    return Domain(choices=[p for p in domain.choices or [] if p in native_precisions])


# The parallel degrees a space may tune; Optuna sees them as one `layout` choice.
DEGREES = ("fsdp", "tp", "pp")
# Knobs that mean something only with a pipeline (asked only when pp > 1).
PIPELINE_KNOBS = ("pp_schedule", "pp_microbatches", "pp_virtual_stages")


def suggest(
    trial: Any, space: SearchSpace, native_precisions: list[str], precision_choices: list[str] | None = None,
    *, world_size: int = 1, workload: WorkloadInfo | None = None,
) -> dict[str, Any]:
    """Ask an Optuna trial for every knob that can vary here; fixed knobs are taken as they are.

    Returns the knob values of the config to run (``fsdp``/``tp``/``pp`` decoded from the layout).
    Precision is asked for among the choices this hardware runs natively, or among
    ``precision_choices`` when the study fixed them (a study one machine created and others
    join: Optuna needs one domain per parameter; a value this machine cannot run is then
    infeasible here, see :func:`precision_rule`). ``world_size`` is the processes the hardware
    gives a trial (the ``world_size`` knob, where the space tunes it, picks up to that);
    ``workload`` (what the search learnt of the model) rules out layouts the model cannot take.
    """
    values: dict[str, Any] = {}
    conditional = {"micro_batch_size", "sequence_parallel", *DEGREES, *PIPELINE_KNOBS}
    for name in space.knobs:
        if KNOBS[name].tile_of is None and name not in conditional:
            domain = allowed_domain(name, space.knobs[name], native_precisions)
            if name == "precision" and precision_choices is not None:
                domain = Domain(choices=list(precision_choices))
            values[name] = _suggest_one(trial, name, domain)

    world = values.get("world_size", world_size)
    fixed_world = "world_size" not in space.knobs or space.knobs["world_size"].fixed
    layouts = [layout_name(world // (f * t * p), f, t, p) for f, t, p in valid_layouts(space, world, workload)]
    if not layouts:  # nothing tiles this world: the smallest degrees, which the layout rule then rejects
        layouts = [layout_name(0, *(min(_integers(space.knobs.get(n), DEFAULTS[n])) for n in DEGREES))]
    name = "layout" if fixed_world else f"layout|world_size={world}"
    layout = layouts[0] if len(layouts) == 1 else trial.suggest_categorical(name, layouts)
    degrees = parse_layout(layout)
    values.update({n: degrees[n] for n in DEGREES if n in space.knobs})

    if "micro_batch_size" in space.knobs:
        ranks = world // (degrees["tp"] * degrees["pp"])  # dp * fsdp: the ranks a global batch is split over
        global_batch = values.get("global_batch_size", DEFAULTS["global_batch_size"])
        rank_batch = global_batch // ranks if ranks and global_batch % ranks == 0 else 0
        domain = space.knobs["micro_batch_size"]
        fits = [m for m in _integers(domain, DEFAULTS["micro_batch_size"]) if rank_batch and rank_batch % m == 0]
        values["micro_batch_size"] = _suggest_one(
            trial, f"micro_batch_size|rank_batch={rank_batch}",
            Domain(choices=fits) if fits else Domain(choices=[min(domain.values())]))

    if degrees["tp"] > 1 and "sequence_parallel" in space.knobs:
        values["sequence_parallel"] = _suggest_one(trial, "sequence_parallel", space.knobs["sequence_parallel"])
    if degrees["pp"] > 1:
        for name in ("pp_schedule", "pp_microbatches"):
            if name in space.knobs:
                values[name] = _suggest_one(trial, name, space.knobs[name])
        schedule = values.get("pp_schedule", DEFAULTS["pp_schedule"])
        if schedule == "interleaved1f1b" and "pp_virtual_stages" in space.knobs:
            domain = space.knobs["pp_virtual_stages"]  # interleaving needs at least two stages per rank
            several = [v for v in domain.values() if v >= 2] if domain.choices is not None else []
            if domain.choices is None and domain.high >= 2:
                domain = Domain(low=max(2, domain.low), high=domain.high, log=domain.log, step=domain.step)
            elif several:
                domain = Domain(choices=several)
            values["pp_virtual_stages"] = _suggest_one(trial, "pp_virtual_stages", domain)

    triton = {k for k, impl in kernel_choices(values).items() if impl == "triton"}
    for name in space.knobs:
        if KNOBS[name].tile_of in triton:
            values[name] = _suggest_one(trial, name, space.knobs[name])
    return values


def valid_layouts(space: SearchSpace, world: int, workload: WorkloadInfo | None) -> list[tuple[int, int, int]]:
    """(fsdp, tp, pp) from the space's domains that tile ``world`` and that the model can take."""
    domains = [_integers(space.knobs.get(n), DEFAULTS[n]) for n in DEGREES]
    return [(f, t, p) for f, t, p in itertools.product(*domains)
            if world % (f * t * p) == 0 and not (workload and degree_problem(workload, t, p))]


def degree_problem(workload: WorkloadInfo, tp: int, pp: int) -> str:
    """Why the model cannot be split ``tp`` ways or into ``pp`` stages ('' if it can)."""
    kv = workload.n_kv_head or workload.n_head
    ffn = workload.ffn_hidden or 4 * workload.n_embd
    if tp > 1 and (workload.reason("tp") or workload.n_head % tp or kv % tp or ffn % tp):
        return workload.reason("tp") or f"n_head={workload.n_head}, n_kv_head={kv}, ffn_hidden={ffn} do not split {tp} ways"
    if pp > 1 and (workload.reason("pp") or workload.n_layer % pp):
        return workload.reason("pp") or f"n_layer={workload.n_layer} does not split into {pp} stages"
    return ""


def layout_name(dp: int, fsdp: int, tp: int, pp: int) -> str:
    """``dp2``, ``fsdp2xtp2``, ...: the degrees above one, joined by ``x`` (one process: ``dp1``)."""
    parts = [f"{n}{d}" for n, d in (("dp", dp), ("fsdp", fsdp), ("tp", tp), ("pp", pp)) if d != 1]
    return "x".join(parts) or "dp1"


def parse_layout(name: str) -> dict[str, int]:
    """The degrees a :func:`layout_name` stands for (``dp``, ``fsdp``, ``tp``, ``pp``)."""
    degrees = {"dp": 1, "fsdp": 1, "tp": 1, "pp": 1}
    for part in name.split("x"):
        match = re.fullmatch(r"(dp|fsdp|tp|pp)(\d+)", part)
        if match is None:
            raise ValueError(f"{name!r} is not a layout name such as dp2, fsdp2xtp2 or pp2")
        degrees[match.group(1)] = int(match.group(2))
    return degrees


def knobs_of_params(params: dict[str, Any]) -> dict[str, Any]:
    """The knob values an Optuna trial's params stand for: conditions dropped, the layout decoded."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        knob = name.partition("|")[0]
        if knob == "layout":
            out.update(parse_layout(value))
        else:
            out[knob] = value
    return out


class Answers:
    """Answers :func:`suggest`'s questions from given knob values (a baseline), noting the params they make.

    ``values`` holds every knob by name, and ``layout`` as a :func:`layout_name`. A value outside
    what the question allows is kept and its problem noted in ``problem``.
    """

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self.params: dict[str, Any] = {}
        self.problem = ""

    def _answer(self, name: str, inside: bool | None, allowed: Any) -> Any:
        knob, _, condition = name.partition("|")
        value = self.values.get(knob)
        if not inside and not self.problem:
            where = "fsdp, tp and pp knobs" if knob == "layout" else f"knobs.{knob}"
            self.problem = (f"its {knob}={value!r} is outside what the space's {where} allow"
                            f"{f' with {condition}' if condition else ''} ({allowed})")
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        value = self.values.get(name.partition("|")[0])
        return self._answer(name, value in choices, choices)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> Any:
        value = self.values.get(name.partition("|")[0])
        return self._answer(name, value is not None and low <= value <= high, [low, high])

    suggest_float = suggest_int


def _integers(domain: Domain | None, default: int) -> list[int]:
    """Every whole value of an integer knob's domain (its default where the space has none)."""
    if domain is None:
        return [default]
    if domain.choices is not None:
        return [int(c) for c in domain.choices]
    step = int(domain.step or 1)
    return list(range(int(domain.low), int(domain.high) + 1, step))


def precision_rule(precision: str, native_precisions: list[str]) -> str:
    """Why this machine cannot run ``precision`` ('' if it can): a study's other machines may."""
    if precision in native_precisions:
        return ""
    return (f"precision={precision} does not run natively on this machine (it runs {', '.join(native_precisions)}); "
            "the study's precision choices come from the machine that created it")


def kernel_choices(values: dict[str, Any]) -> dict[str, str]:
    """torch or triton for each kernel: its own knob if given, else `kernels`."""
    return {k: values.get(f"{k}_kernel") or values.get("kernels") or DEFAULTS["kernels"] for k in KERNELS}


def _suggest_one(trial: Any, name: str, domain: Domain) -> Any:
    knob = KNOBS[name.partition("|")[0]]
    if domain.fixed:
        value = domain.choices[0] if domain.choices is not None else domain.low
    elif domain.choices is not None:
        value = trial.suggest_categorical(name, domain.choices)
    elif knob.type is int:
        step = int(domain.step or 1)
        value = trial.suggest_int(name, int(domain.low), int(domain.high), step=step, log=domain.log)
    else:
        value = trial.suggest_float(name, domain.low, domain.high, step=domain.step, log=domain.log)
    return knob.type(value)


def build_config(
    space: SearchSpace,
    knob_values: dict[str, Any],
    *,
    world_size: int,
    vocab_size: int,
    seed: int = 0,
    profile: bool = False,
    shared_memory_bytes: int | None = None,
    workload: WorkloadInfo | None = None,
) -> tuple[TrialConfig | None, str]:
    """Derive a TrialConfig and say why it is infeasible ('' when it may be launched).

    The config is None only when none can be built at all. ``shared_memory_bytes`` is
    the GPU's shared memory per block (None on CPU), for the Triton tile rules.
    ``workload`` is what the search learnt about the model (cotune.workload); without
    it the space's workload must be the built-in gpt.
    """
    workload = workload or gpt_workload(space, vocab_size)
    v = {**DEFAULTS, **knob_values}
    world = v.get("world_size", world_size)
    if world > world_size:
        return None, f"world_size <= the processes this hardware gives a trial must hold, but got world_size={world}, nproc={world_size}"
    tp, pp, fsdp = v["tp"], v["pp"], v["fsdp"]
    if world % (fsdp * tp * pp):
        return None, (f"world_size % (fsdp * tp * pp) == 0 must hold (dp takes the rest), but got world_size={world}, "
                      f"fsdp={fsdp}, tp={tp}, pp={pp}")
    per_node = world_size // space.hardware.nnodes
    if world > per_node and world % per_node:
        return None, (f"world_size % hardware.nproc == 0 must hold for a trial across machines (whole machines "
                      f"each), but got world_size={world}, nproc={per_node}")
    nnodes = max(1, world // per_node)
    dp = world // (tp * pp * fsdp)
    data_parallel = dp * fsdp
    if v["global_batch_size"] < data_parallel:
        return None, (
            f"global_batch_size >= dp * fsdp must hold, but got global_batch_size={v['global_batch_size']}, "
            f"dp={dp}, fsdp={fsdp}"
        )
    micro = v["micro_batch_size"]
    if "micro_batch_size" not in knob_values:  # not tuned: the largest divisor of a rank's share up to the default
        share = v["global_batch_size"] // data_parallel
        micro = max(m for m in range(1, min(micro, share) + 1) if share % m == 0)
    grad_accum = max(1, v["global_batch_size"] // (micro * data_parallel))
    w = space.workload
    config = TrialConfig(
        workload=WorkloadConfig(
            model=workload.model, config=workload.config, objective=workload.objective, n_layer=workload.n_layer,
            n_embd=workload.n_embd, n_head=workload.n_head, n_kv_head=workload.n_kv_head,
            ffn_hidden=workload.ffn_hidden, seq_len=w.seq_len, vocab_size=workload.vocab_size, data=w.data,
            data_field=w.data_field, tokenizer=w.tokenizer,
        ),
        batch=BatchConfig(micro_batch_size=micro, global_batch_size=v["global_batch_size"], grad_accum_steps=grad_accum),
        parallel=ParallelConfig(
            dp=dp, fsdp=v["fsdp"], tp=v["tp"], pp=v["pp"], sequence_parallel=v["sequence_parallel"] and v["tp"] > 1,
            # Without a pipeline the schedule means nothing: one canonical value, so equal configs look equal
            # (suggest never asks for pipeline knobs without one, nor for sequence parallel without tp).
            pp_schedule=v["pp_schedule"] if v["pp"] > 1 else DEFAULTS["pp_schedule"],
            # A space that does not tune them gets the fewest a schedule runs: pp microbatches, two virtual stages.
            pp_microbatches=(v["pp_microbatches"] if "pp_microbatches" in knob_values else v["pp"]) if v["pp"] > 1 else 1,
            # Virtual stages exist only in the interleaved schedule (which needs two or more: a layout rule).
            pp_virtual_stages=(v["pp_virtual_stages"] if "pp_virtual_stages" in knob_values else 2)
            if v["pp"] > 1 and v["pp_schedule"] == "interleaved1f1b" else 1,
        ),
        precision=PrecisionConfig(precision=v["precision"]),
        optimizer=OptimizerConfig(
            learning_rate=v["learning_rate"], warmup_fraction=v["warmup_fraction"],
            weight_decay=v["weight_decay"], adam_beta1=v["adam_beta1"], adam_beta2=v["adam_beta2"],
            grad_clip=v["grad_clip"],
        ),
        software=SoftwareConfig(activation_checkpointing=v["activation_checkpointing"], compile=v["compile"]),
        kernels=KernelConfig(),
        run=RunConfig(
            device=space.hardware.device, warmup_steps=space.trial.warmup_steps,
            measured_steps=space.trial.measured_steps, token_budget=space.trial.token_budget,
            eval_tokens=space.trial.eval_tokens, timeout_s=space.trial.timeout_s, seed=seed, profile=profile,
            nnodes=nnodes,
        ),
    )
    config = replace(config, kernels=_kernels(v, config))
    return config, (check(config, space) or _workload_rule(config, workload)
                    or _kernel_rule(config, shared_memory_bytes))


def gpt_workload(space: SearchSpace, vocab_size: int) -> WorkloadInfo:
    """The WorkloadInfo of a space whose model is the built-in gpt (known without building it)."""
    if space.workload.model != "gpt":
        raise ValueError(f"the workload {space.workload.model!r} must be described first (cotune.workload.describe)")
    return describe_workload(space.workload, vocab_size=vocab_size)


def _workload_rule(config: TrialConfig, workload: WorkloadInfo) -> str:
    """Why the model cannot run this layout or kernel at all ('' if it can): the reasons the workload gave."""
    par, sw, model = config.parallel, config.software, config.workload.model
    for used, knob, value in ((par.tp > 1, "tp", par.tp), (par.pp > 1, "pp", par.pp),
                              (sw.activation_checkpointing, "activation_checkpointing", True),
                              (par.sequence_parallel, "sequence_parallel", True),
                              (par.sequence_parallel and par.pp > 1, "sequence_parallel_with_pp", True)):
        if used and workload.reason(knob):
            return f"{knob}={value} cannot run on {model}: {workload.reason(knob)}"
    for kernel in config.kernels.selected():
        if kernel not in workload.kernels:
            fits = ", ".join(workload.kernels) or "none"
            return (f"{kernel}_kernel=triton cannot run on {model} ({config.workload.objective}): cotune's "
                    f"{kernel} kernel fits the built-in gpt's; the Triton kernels that fit this model: {fits}")
    return ""


def check(config: TrialConfig, space: SearchSpace) -> str:
    """The first declared constraint the config breaks, as a sentence with every value; '' if none."""
    values = {**config.flat(), **_workload_values(config)}
    values["grad_accum_steps"] = config.batch.grad_accum_steps
    for c in space.constraints:
        if not constraints.evaluate(c.expr, values):
            used = ", ".join(f"{n}={values[n]}" for n in sorted(constraints.names(c.expr)))
            why = f" ({c.why})" if c.why else ""
            return f"{c.expr} must hold{why}, but got {used}"
    return _layout_rule(config)


def _layout_rule(config: TrialConfig) -> str:
    """Rules every parallel layout must meet, whatever the space declares; '' if it does."""
    par, w, b = config.parallel, config.workload, config.batch
    stages = par.pp * par.pp_virtual_stages
    run, budget = config.run, config.budget_steps
    rules = [
        (b.global_batch_size == b.micro_batch_size * par.dp * par.fsdp * b.grad_accum_steps,
         f"global_batch_size % (micro_batch_size * dp * fsdp) == 0 must hold (a global batch is a whole number of "
         f"micro batches on every data-parallel rank), but got global_batch_size={b.global_batch_size}, "
         f"micro_batch_size={b.micro_batch_size}, dp={par.dp}, fsdp={par.fsdp}"),
        (budget >= run.warmup_steps + run.measured_steps,
         f"token_budget / (global_batch_size * seq_len) >= warmup_steps + measured_steps must hold (the timed steps "
         f"come before the validation loss, never with it), but got {budget} steps to the budget "
         f"(token_budget={run.token_budget}, global_batch_size={b.global_batch_size}, seq_len={w.seq_len}), "
         f"warmup_steps={run.warmup_steps}, measured_steps={run.measured_steps}"),
        (w.n_head % par.tp == 0 and w.kv_heads % par.tp == 0 and w.ffn_width % par.tp == 0,
         f"n_head % tp == 0, n_kv_head % tp == 0 and ffn_hidden % tp == 0 must hold (whole heads and MLP columns "
         f"per rank), but got n_head={w.n_head}, n_kv_head={w.kv_heads}, ffn_hidden={w.ffn_width}, tp={par.tp}"),
        (w.n_layer % stages == 0,
         f"n_layer % (pp * pp_virtual_stages) == 0 must hold, but got n_layer={w.n_layer}, pp={par.pp}, "
         f"pp_virtual_stages={par.pp_virtual_stages}"),
        (par.pp == 1 or b.micro_batch_size % par.pp_microbatches == 0,
         f"micro_batch_size % pp_microbatches == 0 must hold, but got micro_batch_size={b.micro_batch_size}, "
         f"pp_microbatches={par.pp_microbatches}"),
        (par.pp == 1 or par.pp_schedule == "gpipe" or par.pp_microbatches >= par.pp,
         f"pp_microbatches >= pp must hold for {par.pp_schedule}, but got pp_microbatches={par.pp_microbatches}, pp={par.pp}"),
        (par.pp == 1 or (par.pp_schedule == "interleaved1f1b") == (par.pp_virtual_stages > 1),
         f"pp_virtual_stages > 1 exactly when pp_schedule is interleaved1f1b, but got "
         f"pp_schedule={par.pp_schedule}, pp_virtual_stages={par.pp_virtual_stages}"),
        (par.pp == 1 or par.pp_schedule != "interleaved1f1b" or par.pp_microbatches % par.pp == 0,
         f"pp_microbatches % pp == 0 must hold for interleaved1f1b, but got pp_microbatches={par.pp_microbatches}, pp={par.pp}"),
        (not par.sequence_parallel or w.seq_len % par.tp == 0,
         f"seq_len % tp == 0 must hold with sequence_parallel, but got seq_len={w.seq_len}, tp={par.tp}"),
    ]
    return next((reason for ok, reason in rules if not ok), "")


def _workload_values(config: TrialConfig) -> dict[str, Any]:
    w = config.workload
    return {"n_layer": w.n_layer, "n_embd": w.n_embd, "n_head": w.n_head, "n_kv_head": w.kv_heads,
            "ffn_hidden": w.ffn_width, "seq_len": w.seq_len, "vocab_size": w.vocab_size, "model": w.model,
            "data": w.data, "tokenizer": w.tokenizer}


def _kernels(v: dict[str, Any], config: TrialConfig) -> KernelConfig:
    """The kernel choices, sampled tiles as they are, tiles left out cut to their dimension."""
    dims = tiles.kernel_shapes(config)
    fitted = {  # tile knob -> the dimension it tiles (a block wider than it computes only padding)
        "mlp_block_m": dims["mlp"]["M"], "mlp_block_n": dims["mlp"]["N"], "mlp_block_k": dims["mlp"]["K"],
        "ce_block_size": dims["cross_entropy"]["V"], "ln_block_size": dims["layernorm"]["C"],
    }
    default = KernelConfig()
    values: dict[str, Any] = dict(kernel_choices(v))
    for f in dataclasses.fields(KernelConfig):
        if f.name in KERNELS:
            continue
        if v.get(f.name) is not None:
            values[f.name] = v[f.name]
        else:
            value = getattr(default, f.name)
            floor = tiles.MIN_DOT_BLOCK if f.name.startswith("mlp_block") else 1
            values[f.name] = max(floor, min(value, tiles.next_power_of_2(fitted[f.name]))) if f.name in fitted else value
    return KernelConfig(**values)


def _kernel_rule(config: TrialConfig, shared_memory_bytes: int | None) -> str:
    """Why the Triton kernels of ``config`` cannot run ('' if they can, or none is selected)."""
    k, par = config.kernels, config.parallel
    if k.mlp == "triton" and par.tp > 1:
        return ("mlp_kernel=triton with tp > 1 is not run yet (the kernel would bypass the column-wise "
                f"split of mlp.fc), but got tp={par.tp}")
    if k.layernorm == "triton" and par.sequence_parallel:
        return "layernorm_kernel=triton with sequence_parallel is not run yet (its weights are DTensors there)"
    if config.run.device == "cpu" and k.selected() and config.precision.precision != "fp32":
        return (f"Triton kernels on CPU run in the interpreter in fp32 only, but got "
                f"precision={config.precision.precision} with {', '.join(k.selected())} in triton")
    dtype_bytes = 4 if config.precision.precision == "fp32" else 2
    shapes = tiles.kernel_shapes(config)
    for kernel in k.selected():
        reason = tiles.infeasible_reason(kernel, tiles.kernel_tiles(k, kernel), shapes[kernel], dtype_bytes,
                                         shared_memory_bytes)
        if reason:
            return f"{kernel} kernel: {reason}"
    return ""
