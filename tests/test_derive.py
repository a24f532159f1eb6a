from __future__ import annotations

import optuna
import pytest

from cotune import derive
from cotune.config import TrialConfig
from cotune.space import load_space
from tests.conftest import CPU_SPACE, ROOT


@pytest.fixture()
def cpu_space():
    return load_space(CPU_SPACE)


def test_micro_batch_runs_as_given_and_accumulation_is_derived(cpu_space):
    config, reason = derive.build_config(
        cpu_space, {"micro_batch_size": 4, "global_batch_size": 64}, world_size=1, vocab_size=256
    )
    assert reason == ""
    assert (config.batch.micro_batch_size, config.batch.grad_accum_steps) == (4, 16)
    assert config.workload.vocab_size == 256 and config.run.token_budget == cpu_space.trial.token_budget
    # A micro batch larger than the global batch is not cut down behind the sampler's back: it cannot run.
    config, reason = derive.build_config(
        cpu_space, {"micro_batch_size": 32, "global_batch_size": 8}, world_size=1, vocab_size=256
    )
    assert config.batch.micro_batch_size == 32 and "micro_batch_size=32" in reason and "global_batch_size=8" in reason
    bare = cpu_space.model_copy(update={"knobs": {}, "constraints": []})
    config, reason = derive.build_config(bare, {"global_batch_size": 12}, world_size=1, vocab_size=256)
    assert reason == "" and config.batch.micro_batch_size == 6  # untuned: the largest divisor of 12 up to 8


def test_layout_degrees_run_as_given():
    space = load_space(ROOT / "benchmarks" / "spaces" / "gpu-8-gpt2-medium.yaml")

    def layout(values, world):
        config, reason = derive.build_config(space, values, world_size=world, vocab_size=256)
        assert reason == "", reason
        p = config.parallel
        return p.dp, p.fsdp, p.tp, p.pp

    assert layout({"fsdp": 2, "tp": 2, "pp": 1, "micro_batch_size": 4, "global_batch_size": 64}, 8) == (2, 2, 2, 1)
    assert layout({"tp": 8, "global_batch_size": 64}, 8) == (1, 1, 8, 1)
    # Degrees that do not tile the world are refused, never refitted.
    config, reason = derive.build_config(space, {"tp": 4, "pp": 4}, world_size=8, vocab_size=256)
    assert config is None and reason == ("world_size % (fsdp * tp * pp) == 0 must hold (dp takes the rest), "
                                         "but got world_size=8, fsdp=1, tp=4, pp=4")
    _, reason = derive.build_config(space, {"tp": 3, "global_batch_size": 64}, world_size=6, vocab_size=256)
    assert reason.startswith("n_head % tp == 0") and "n_head=16, tp=3" in reason


def test_layout_names_round_trip():
    for degrees in [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (2, 1, 2, 2), (1, 4, 2, 1)]:
        name = derive.layout_name(*degrees)
        assert tuple(derive.parse_layout(name).values()) == degrees
    assert derive.layout_name(1, 2, 2, 1) == "fsdp2xtp2" and derive.layout_name(1, 1, 1, 1) == "dp1"
    with pytest.raises(ValueError, match="is not a layout name"):
        derive.parse_layout("zp2")


def test_optuna_is_asked_only_for_layouts_that_tile_the_world_and_fit_the_model():
    space = load_space(ROOT / "benchmarks" / "spaces" / "gpu-8-gpt2-medium.yaml")
    space = space.model_copy(update={"workload": space.workload.model_copy(update={"n_layer": 2})})
    workload = derive.gpt_workload(space, 256)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    derive.suggest(trial, space, ["bf16"], world_size=8, workload=workload)
    choices = trial.distributions["layout"].choices  # world_size is fixed: one unconditional name
    degrees = [derive.parse_layout(c) for c in choices]
    assert all(d["dp"] * d["fsdp"] * d["tp"] * d["pp"] == 8 for d in degrees)
    assert {d["pp"] for d in degrees} == {1, 2}  # 2 layers: no 4-stage pipeline is offered
    assert len(choices) == len(set(choices)) and "fsdp2xtp4" in choices and "dp8" in choices


def ran_knobs(params: dict) -> dict:
    """Optuna's params as knob values of a config (``kernels`` stands for each kernel without its own knob)."""
    knobs = derive.knobs_of_params(params)
    if "kernels" in knobs:
        knobs.update({f"{k}_kernel": impl for k, impl in derive.kernel_choices(knobs).items()})
        del knobs["kernels"]
    return knobs


@pytest.mark.parametrize("space_file, world", [("search_spaces/cpu-tiny-gpt.yaml", 2),
                                               ("benchmarks/spaces/gpu-8-gpt2-medium.yaml", 8)])
def test_optuna_params_are_the_knobs_that_run(space_file, world):
    """Every value Optuna records is the value in the config that runs; nothing is refitted after sampling."""
    space = load_space(ROOT / space_file)
    native = ["fp32", "bf16", "fp16"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    layouts, feasible = set(), 0
    for _ in range(150):
        trial = study.ask()
        values = derive.suggest(trial, space, native, world_size=world, workload=derive.gpt_workload(space, 256))
        config, reason = derive.build_config(space, values, world_size=world, vocab_size=256)
        flat, asked = config.flat(), ran_knobs(trial.params)
        assert {k: flat[k] for k in asked} == asked
        for name, dist in trial.distributions.items():
            if name.startswith("micro_batch_size|rank_batch="):
                rank_batch = int(name.rpartition("=")[2])
                assert all(rank_batch % m == 0 for m in dist.choices), (name, dist.choices)
                assert rank_batch == config.batch.global_batch_size // (config.parallel.dp * config.parallel.fsdp)
        assert ("sequence_parallel" in trial.params) == (config.parallel.tp > 1 and "sequence_parallel" in space.knobs
                                                         and not space.knobs["sequence_parallel"].fixed)
        layouts.add(derive.layout_name(config.parallel.dp, config.parallel.fsdp, config.parallel.tp, config.parallel.pp))
        feasible += reason == ""
        study.tell(trial, 0.0)
    assert len(layouts) >= 4 and feasible >= 50


def test_answers_turn_a_baseline_into_params(cpu_space):
    values = {**derive.DEFAULTS, **cpu_space.baseline, "world_size": 2, "layout": "fsdp2"}
    answers = derive.Answers(values)
    knobs = derive.suggest(answers, cpu_space, ["fp32"], world_size=2)
    assert answers.problem == ""
    assert answers.params["layout|world_size=2"] == "fsdp2" and knobs["fsdp"] == 2
    assert answers.params["micro_batch_size|rank_batch=16"] == 8  # 32 rows over two ranks
    answers = derive.Answers({**values, "micro_batch_size": 32})
    derive.suggest(answers, cpu_space, ["fp32"], world_size=2)
    assert answers.problem == ("its micro_batch_size=32 is outside what the space's knobs.micro_batch_size allow "
                               "with rank_batch=16 ([4, 8, 16])")


def test_layout_rules_and_constraints_name_every_value():
    space = load_space(ROOT / "benchmarks" / "spaces" / "gpu-8-gpt2-medium.yaml")
    space22 = space.model_copy(update={"workload": space.workload.model_copy(update={"n_layer": 22})})
    _, reason = derive.build_config(space22, {"pp": 4}, world_size=4, vocab_size=256)
    assert reason.startswith("n_layer % pp == 0 must hold") and "n_layer=22, pp=4" in reason
    _, reason = derive.build_config(space, {"pp": 2, "micro_batch_size": 2, "pp_microbatches": 4,
                                            "global_batch_size": 64}, world_size=2, vocab_size=256)
    assert reason == "micro_batch_size % pp_microbatches == 0 must hold, but got micro_batch_size=2, pp_microbatches=4"
    config, reason = derive.build_config(space, {"pp": 2, "pp_schedule": "interleaved1f1b", "pp_microbatches": 4,
                                                 "global_batch_size": 64}, world_size=2, vocab_size=256)
    assert reason == "" and config.parallel.pp_virtual_stages == 2  # not tuned: the fewest interleaving runs
    _, reason = derive.build_config(space, {"pp": 2, "pp_schedule": "interleaved1f1b", "pp_microbatches": 4,
                                            "pp_virtual_stages": 1, "global_batch_size": 64}, world_size=2,
                                    vocab_size=256)
    assert reason.startswith("pp_virtual_stages > 1 exactly when pp_schedule is interleaved1f1b")
    config, _ = derive.build_config(space, {"pp": 2, "pp_schedule": "1f1b", "pp_virtual_stages": 2,
                                            "global_batch_size": 64, "pp_microbatches": 4}, world_size=2, vocab_size=256)
    assert config.parallel.pp_virtual_stages == 1
    gpu8 = load_space(ROOT / "benchmarks" / "spaces" / "gpu-8-gpt2-medium.yaml")
    gpu8 = gpu8.model_copy(update={"workload": gpu8.workload.model_copy(update={"seq_len": 60})})
    _, reason = derive.build_config(gpu8, {"tp": 8, "sequence_parallel": True, "global_batch_size": 64},
                                    world_size=8, vocab_size=256)
    assert reason == "seq_len % tp == 0 must hold with sequence_parallel, but got seq_len=60, tp=8"
    config, reason = derive.build_config(space, {"tp": 1, "sequence_parallel": True}, world_size=8, vocab_size=256)
    assert config.parallel.sequence_parallel is False  # nothing to shard along the sequence without tp


def test_declared_constraint_names_every_value(cpu_space):
    space = cpu_space.model_copy(update={"constraints": [
        *cpu_space.constraints,
        *load_space(ROOT / "benchmarks" / "spaces" / "gpu-1-gpt2-small.yaml").constraints,
    ]})
    space = space.model_copy(update={"workload": space.workload.model_copy(update={"seq_len": 2048})})
    _, reason = derive.build_config(space, {"micro_batch_size": 32, "global_batch_size": 32}, world_size=1,
                                    vocab_size=256)
    assert "activation_checkpointing=False, micro_batch_size=32, seq_len=2048" in reason


def test_suggest_drops_precisions_the_hardware_does_not_run(cpu_space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        values = derive.suggest(trial, cpu_space, native_precisions=["fp32"])
        seen.add(values["precision"])
        assert "precision" not in trial.params  # a single remaining choice is fixed, not sampled
        assert values["compile"] is False and isinstance(values["micro_batch_size"], int)
        study.tell(trial, 0.0)
    assert seen == {"fp32"}
    trial = study.ask()
    values = derive.suggest(trial, cpu_space, native_precisions=["fp32", "bf16"])
    assert "precision" in trial.params and values["precision"] in ("fp32", "bf16")


def test_config_round_trips_through_json(cpu_space):
    config, _ = derive.build_config(cpu_space, {"learning_rate": 3e-3}, world_size=1, vocab_size=256)
    again = TrialConfig.from_dict(__import__("json").loads(config.to_json()))
    assert again == config
    with pytest.raises(ValueError, match=r"config.batch: unknown key\(s\) \['micro'\]"):
        TrialConfig.from_dict({**config.to_dict(), "batch": {"micro": 1}})


def test_tile_knobs_are_asked_for_only_when_their_kernel_runs_in_triton():
    space = load_space(ROOT / "benchmarks" / "spaces" / "gpu-1-gpt2-small.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(30):
        values = derive.suggest(study.ask(), space, ["fp32", "bf16", "fp16"])
        tile_knobs = {n for n in values if n.startswith(("mlp_", "ce_", "ln_"))}
        seen.add(values["kernels"])
        assert bool(tile_knobs) == (values["kernels"] == "triton"), values
    assert seen == {"torch", "triton"}


def test_tiles_left_out_are_cut_to_their_dimension(cpu_space):
    config, reason = derive.build_config(cpu_space, {"kernels": "triton", "micro_batch_size": 4},
                                         world_size=1, vocab_size=256)
    assert reason == ""
    k = config.kernels
    assert (k.mlp, k.cross_entropy, k.layernorm) == ("triton", "triton", "triton")
    # n_embd 64: the LayerNorm block covers 64 channels, not the default 1024; vocabulary 256.
    assert (k.ln_block_size, k.ce_block_size) == (64, 256)
    assert (k.mlp_block_m, k.mlp_block_n, k.mlp_block_k) == (64, 64, 32)  # M = 4 * 64, N = 256, K = 64
    config, _ = derive.build_config(cpu_space, {"kernels": "triton", "layernorm_kernel": "torch"},
                                    world_size=1, vocab_size=256)
    assert config.kernels.selected() == ["mlp", "cross_entropy"]


def test_tile_rules_name_every_value(cpu_space):
    _, reason = derive.build_config(cpu_space, {"kernels": "triton", "ce_block_size": 1024}, world_size=1,
                                    vocab_size=256)
    assert reason == "cross_entropy kernel: BLOCK_SIZE <= next_power_of_2(V) must hold, but got BLOCK_SIZE=1024, V=256"
    _, reason = derive.build_config(cpu_space, {"kernels": "triton", "precision": "bf16"}, world_size=1,
                                    vocab_size=256)
    assert reason.startswith("Triton kernels on CPU run in the interpreter in fp32 only, but got precision=bf16")
    gpu = load_space(ROOT / "benchmarks" / "spaces" / "gpu-1-gpt2-small.yaml")
    big = {"kernels": "triton", "precision": "bf16", "mlp_block_m": 128, "mlp_block_n": 128, "mlp_block_k": 64,
           "mlp_num_stages": 4, "ce_block_size": 256, "ln_block_size": 256}
    _, reason = derive.build_config(gpu, big, world_size=1, vocab_size=256, shared_memory_bytes=232448)
    assert reason == ""  # 4 * (128*64 + 64*128) * 2 bytes = 128 KiB fits an H100's 227 KiB
    _, reason = derive.build_config(gpu, big, world_size=1, vocab_size=256, shared_memory_bytes=99 * 1024)
    assert reason.startswith("mlp kernel: num_stages * (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * dtype_bytes")
    gpu8 = load_space(ROOT / "benchmarks" / "spaces" / "gpu-8-gpt2-medium.yaml")
    _, reason = derive.build_config(gpu8, {"kernels": "triton", "tp": 2, "precision": "bf16"}, world_size=8,
                                    vocab_size=256)
    assert reason.startswith("mlp_kernel=triton with tp > 1 is not run yet") and "tp=2" in reason


def test_a_budget_that_cannot_hold_the_timed_steps_is_infeasible(cpu_space):
    """The validation loss is taken after the budget; the timed window must end before it."""
    short = cpu_space.model_copy(update={"trial": cpu_space.trial.model_copy(update={"token_budget": 64 * 64 * 10})})
    _, reason = derive.build_config(short, {"global_batch_size": 64}, world_size=1, vocab_size=258)
    assert reason.startswith("token_budget / (global_batch_size * seq_len) >= warmup_steps + measured_steps must hold")
    assert "but got 10 steps to the budget (token_budget=40960, global_batch_size=64, seq_len=64), " \
           "warmup_steps=3, measured_steps=20" in reason
    _, reason = derive.build_config(short, {"global_batch_size": 8, "micro_batch_size": 8}, world_size=1,
                                    vocab_size=258)
    assert reason == ""  # 80 steps at the smaller batch
