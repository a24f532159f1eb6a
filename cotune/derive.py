"""From sampled knob values to a TrialConfig, and whether it may be launched.

Dependent knobs are derived so that most infeasible configs cannot be expressed:
the degrees are fitted to the world size (tp, then pp, then fsdp, each cut to a
divisor of what is left) and ``dp = world_size / (fsdp * tp * pp)``; the micro batch
is capped at the global batch per data-parallel rank and ``grad_accum_steps = global
/ (micro * dp * fsdp)``; virtual pipeline stages exist only for the interleaved
schedule. What cannot be made structural is a YAML constraint or a layout rule,
checked here before launch.
"""

from __future__ import annotations

import dataclasses
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


def suggest(
    trial: Any, space: SearchSpace, native_precisions: list[str], precision_choices: list[str] | None = None
) -> dict[str, Any]:
    """Ask an Optuna trial for every non-fixed knob; fixed knobs are taken as they are.

    Precision is asked for among the choices this hardware runs natively, or among
    ``precision_choices`` when the study fixed them (a study one machine created and others
    join: Optuna needs one domain per parameter; a value this machine cannot run is then
    infeasible here, see :func:`precision_rule`). A kernel's tile knobs are conditional: asked
    for only when that kernel runs in Triton, so a trial in torch does not carry tile values
    that meant nothing to it.
    """
    values: dict[str, Any] = {}
    plain = [n for n in space.knobs if KNOBS[n].tile_of is None]
    for name in plain:
        domain = allowed_domain(name, space.knobs[name], native_precisions)
        if name == "precision" and precision_choices is not None:
            domain = Domain(choices=list(precision_choices))
        values[name] = _suggest_one(trial, name, domain)
    triton = {k for k, impl in kernel_choices(values).items() if impl == "triton"}
    for name in space.knobs:
        if KNOBS[name].tile_of in triton:
            values[name] = _suggest_one(trial, name, space.knobs[name])
    return values


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
    knob = KNOBS[name]
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
    # The layout is made to tile the world: each degree, in turn, is cut to the largest divisor
    # of what is left (tp innermost, then pp, then fsdp), and dp takes the rest. So a sampled
    # tp=2 in a one-process trial runs (and is recorded) as tp=1 rather than being infeasible.
    tp = _fit(v["tp"], world)
    pp = _fit(v["pp"], world // tp)
    fsdp = _fit(v["fsdp"], world // (tp * pp))
    dp = world // (tp * pp * fsdp)
    v.update(tp=tp, pp=pp, fsdp=fsdp)
    data_parallel = dp * v["fsdp"]
    if v["global_batch_size"] < data_parallel:
        return None, (
            f"global_batch_size >= dp * fsdp must hold, but got global_batch_size={v['global_batch_size']}, "
            f"dp={dp}, fsdp={v['fsdp']}"
        )
    micro = min(v["micro_batch_size"], v["global_batch_size"] // data_parallel)
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
            # Without a pipeline the schedule means nothing: one canonical value, so equal configs look equal.
            pp_schedule=v["pp_schedule"] if v["pp"] > 1 else DEFAULTS["pp_schedule"], pp_microbatches=_microbatches(v) if v["pp"] > 1 else 1,
            # Virtual stages exist only in the interleaved schedule, which needs at least two.
            pp_virtual_stages=(max(2, v["pp_virtual_stages"]) if v["pp_schedule"] == "interleaved1f1b" else 1)
            if v["pp"] > 1 else 1,
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


def _microbatches(v: dict[str, Any]) -> int:
    """1F1B schedules need at least pp microbatches to fill the pipeline (a multiple of pp
    when interleaved); GPipe takes any count."""
    n, pp = v["pp_microbatches"], v["pp"]
    if v["pp_schedule"] == "gpipe":
        return n
    return max(n, pp) if v["pp_schedule"] == "1f1b" else -(-max(n, pp) // pp) * pp


def _fit(requested: int, available: int) -> int:
    """The largest divisor of ``available`` that is at most ``requested``."""
    return max(d for d in range(1, min(requested, available) + 1) if available % d == 0)


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
