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


def test_micro_batch_is_capped_and_accumulation_derived(cpu_space):
    config, reason = derive.build_config(
        cpu_space, {"micro_batch_size": 32, "global_batch_size": 8}, world_size=1, vocab_size=256
    )
    assert reason == ""
    assert (config.batch.micro_batch_size, config.batch.grad_accum_steps) == (8, 1)
    config, _ = derive.build_config(
        cpu_space, {"micro_batch_size": 4, "global_batch_size": 64}, world_size=1, vocab_size=256
    )
    assert (config.batch.micro_batch_size, config.batch.grad_accum_steps) == (4, 16)
    assert config.workload.vocab_size == 256 and config.run.token_budget == cpu_space.trial.token_budget


def test_data_parallel_degree_is_derived_and_checked():
    space = load_space(ROOT / "search_spaces" / "gpu-8-gpt2-medium.yaml")
    config, reason = derive.build_config(
        space, {"fsdp": 2, "tp": 2, "pp": 1, "micro_batch_size": 4, "global_batch_size": 64},
        world_size=8, vocab_size=256,
    )
    assert config is None  # world size 8 is above one process: not run yet, but the layout itself is valid
    assert "world_size=8 (dp=2, fsdp=2, tp=2, pp=1)" in reason
    _, reason = derive.build_config(space, {"tp": 8, "pp": 4}, world_size=8, vocab_size=256)
    assert reason == "world_size % (fsdp * tp * pp) == 0 must hold, but got world_size=8, fsdp=1, tp=8, pp=4"
    space3 = space.model_copy(update={"workload": space.workload.model_copy(update={"n_layer": 22})})
    _, reason = derive.build_config(space3, {"pp": 4}, world_size=4, vocab_size=256)
    assert reason.startswith("n_layer % pp == 0 must hold") and "n_layer=22, pp=4" in reason


def test_declared_constraint_names_every_value(cpu_space):
    space = cpu_space.model_copy(update={"constraints": [
        *cpu_space.constraints,
        *load_space(ROOT / "search_spaces" / "gpu-1-gpt2-small.yaml").constraints[1:],
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
