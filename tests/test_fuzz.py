"""Fuzzed inputs (hypothesis): space YAML, TrialConfig JSON and command-line values.

Every input ends in exit 0 or in one ``error:`` line with exit 2, never a traceback, and a
study is never changed by a command that rejected its input. The commands run in this
process (``cotune.cli.main``, the real entry point), so a bug surfaces as the exception
itself; the study they read is a real SQLite study written by the search loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotune import cli, search
from cotune.config import TrialConfig, TrialResult
from cotune.space import load_space
from tests.conftest import CPU_SPACE

# Derandomised: the same examples every run, so CI is repeatable; widen max_examples locally to search further.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values a field might be given by mistake: wrong types, out-of-range numbers, odd text.
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 70), max_size=4), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict."""
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


def _mutate(tree: dict, path: tuple, action: str, value) -> dict:
    tree = json.loads(json.dumps(tree))
    *parents, last = path
    node = tree
    for key in parents:
        node = node[key]
    if action == "delete":
        del node[last]
    elif action == "replace":
        node[last] = value
    else:  # a key the schema does not have, beside this one
        node[f"{last}_x"] = value
    return tree


def _run(capsys, *argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``cotune ARGV`` in this process, in ``cwd`` (where a command writes what it writes by default, such as
    reports/): (exit code, stdout, stderr)."""
    saved = sys.argv
    sys.argv = ["cotune", *argv]
    try:
        with pytest.raises(SystemExit) as done, contextlib.chdir(cwd or Path.cwd()):
            cli.main()
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    code = done.value.code if isinstance(done.value.code, int) else 0
    return code, out, err


def _one_error_line(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, out[-500:], err[-500:])
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err


SPACE = yaml.safe_load(CPU_SPACE.read_text())


@FUZZ
@given(data=st.data())
def test_a_fuzzed_space_is_accepted_or_one_error_line(tmp_path_factory, capsys, data):
    path = data.draw(st.sampled_from(_paths(SPACE)))
    action = data.draw(st.sampled_from(["delete", "replace", "add"]))
    mutated = _mutate(SPACE, path, action, data.draw(ODD))
    space_file = tmp_path_factory.mktemp("space") / "fuzzed.yaml"
    space_file.write_text(yaml.safe_dump(mutated))
    _one_error_line(*_run(capsys, "spaces", "--check", str(space_file)))


@FUZZ
@given(text=st.text(max_size=200))
def test_a_space_file_of_any_text_is_one_error_line_or_a_space(tmp_path_factory, capsys, text):
    space_file = tmp_path_factory.mktemp("space") / "any.yaml"
    space_file.write_text(text)
    _one_error_line(*_run(capsys, "spaces", "--check", str(space_file)))


CONFIG = TrialConfig().to_dict()


@FUZZ
@given(data=st.data())
def test_a_fuzzed_trial_config_loads_or_is_a_value_error(tmp_path_factory, data):
    # cotune trial and python -m cotune.trial turn OSError and ValueError into one error line, exit 2; anything
    # else would be a crash with a traceback.
    path = data.draw(st.sampled_from(_paths(CONFIG)))
    mutated = _mutate(CONFIG, path, data.draw(st.sampled_from(["delete", "replace", "add"])), data.draw(ODD))
    config_file = tmp_path_factory.mktemp("config") / "config.json"
    config_file.write_text(json.dumps(mutated, allow_nan=True))
    try:
        TrialConfig.load(config_file)
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- command-line values


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, fingerprint) -> Path:
    """A SQLite study of 6 trials written by the search loop (trials that return at once)."""
    folder = tmp_path_factory.mktemp("study")
    space = load_space(CPU_SPACE)
    s = search.SearchSettings(space=space, space_path=str(CPU_SPACE), objectives=list(space.objectives), budget=6,
                              fingerprint=fingerprint, vocab_size=256, runs_dir=folder / "runs", seed=0,
                              world_size=search.check_hardware(space, str(CPU_SPACE), fingerprint))
    import optuna

    study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{folder / 'cotune.db'}"),
                                          "cpu-tiny-gpt", s, baseline=True)

    def fake(config, trial_dir, on_rung=None):
        loss = 2.0 + abs(math.log10(config.optimizer.learning_rate) + 2.5)
        return TrialResult("ok", metrics={"tokens_per_second": 1000.0 * config.batch.micro_batch_size,
                                          "val_loss": loss, "peak_memory_bytes": 1e6}, loss_curve=[[1, 64, loss]])

    search.run_search(study, s, fake)
    return folder / "cotune.db"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _study_copy(study_db: Path, tmp_path_factory, name: str) -> tuple[Path, Path, str]:
    """A fresh folder holding a copy of the study: (folder, database, the database's digest)."""
    work = tmp_path_factory.mktemp(name)
    db = work / "cotune.db"
    shutil.copy(study_db, db)
    return work, db, _digest(db)


VALUES = st.one_of(st.text(max_size=16), st.integers(-5, 10**6).map(str), st.sampled_from(
    ["", "-1", "0", "nan", "inf", "knee", "trial:3", "trial:x", "json", "hf", "sqlite:///", "sqlite:////no/such/dir/x.db",
     "postgresql://u:secret@127.0.0.1:1/db", "cpu-tiny-gpt", "../x", "throughput,loss", "loss,loss"]))
COMMANDS = {
    "best": ["--study"], "trials": ["--study"], "report": ["--study", "-o", "--summary"],
    "export": ["--format", "--pick", "--study", "-o"],
}


@FUZZ
@given(data=st.data())
def test_fuzzed_flags_of_the_reading_commands_never_change_the_study(study_db, tmp_path_factory, capsys, data):
    work, db, before = _study_copy(study_db, tmp_path_factory, "cmd")
    command = data.draw(st.sampled_from(sorted(COMMANDS)))
    storage = data.draw(st.one_of(st.just(f"sqlite:///{db}"), VALUES))
    argv = [command, "--storage", storage]
    for flag in data.draw(st.lists(st.sampled_from(COMMANDS[command]), unique=True, max_size=3)):
        if flag == "--summary":
            argv.append(flag)
        elif flag == "-o":
            argv += [flag, str(work / data.draw(st.sampled_from(["out.html", "out.json", "no/such/dir/out", "."])))]
        else:
            argv += [flag, data.draw(VALUES)]
    if command == "export" and "--format" not in argv:
        argv += ["--format", "json"]
    code, out, err = _run(capsys, *argv, cwd=work)
    _one_error_line(code, out, err)
    _password_not_shown(argv, out + err)
    assert _digest(db) == before


def _password_not_shown(argv: list[str], output: str) -> None:
    """A password given in --storage is never printed (the same text given as another flag's value may be)."""
    elsewhere = any("secret" in a for i, a in enumerate(argv) if i == 0 or argv[i - 1] != "--storage")
    assert elsewhere or "secret" not in output, output


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_search_flags_are_one_error_line_and_leave_the_study_alone(study_db, tmp_path_factory, capsys, data):
    # The budget is at most what the study holds, so an accepted command finds it spent and runs nothing.
    work, db, before = _study_copy(study_db, tmp_path_factory, "search")
    argv = ["search", "--storage", f"sqlite:///{db}", "--budget", data.draw(st.sampled_from(["6", "0", "-3", "x", "5"]))]
    # (Not --study: a new name is a new study, which a valid command would start searching.)
    for flag in data.draw(st.lists(st.sampled_from(["--objectives", "--sampler", "--seed", "--space", "--data",
                                                    "--dead-after"]), unique=True, max_size=3)):
        argv += [flag, data.draw(VALUES)]
    code, out, err = _run(capsys, *argv, cwd=work)
    _one_error_line(code, out, err)
    _password_not_shown(argv, out + err)
    if code == 2:
        assert _digest(db) == before
