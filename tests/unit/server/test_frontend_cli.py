"""``autoglm-server`` flags: each has its AUTOGLM_* variable, documented in
docs/architecture.md, and lands in the right config field."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm_server.cli import FLAGS, JsonFormatter, build_configs, build_parser
from autoglm_server.engine.config import BatchingConfig, EngineConfig

ROOT = Path(__file__).resolve().parents[3]


def _documented_env_vars() -> dict[str, str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(AUTOGLM_[A-Z0-9_]+)` \| [^|]+ \| ([^|]+) \|$", text, flags=re.M)
    return {name: default.strip() for name, default in rows}


def test_every_flag_is_documented_and_every_documented_variable_is_a_flag() -> None:
    documented = _documented_env_vars()
    assert len(documented) >= 18
    assert {f.env for f in FLAGS} == set(documented)


def test_the_parser_has_exactly_the_flags_of_the_table() -> None:
    parser = build_parser({"AUTOGLM_MODEL": "/m"})
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    expected = {f"--{f.name}" for f in FLAGS}
    assert expected <= options
    assert options - expected - {"--help"} == {
        f"--no-{f.name}" for f in FLAGS if f.type.__name__ == "parse_bool"
    }


def test_batching_and_engine_fields_exist() -> None:
    batching = set(BatchingConfig.__dataclass_fields__)
    engine = set(EngineConfig.__dataclass_fields__)
    for flag in FLAGS:
        if flag.target == "batching":
            assert flag.dest in batching, flag.name
        if flag.target == "engine":
            assert flag.dest in engine, flag.name
    # Every batching knob is reachable from the command line.
    assert batching == {f.dest for f in FLAGS if f.target == "batching"}


def test_defaults_match_the_table_and_the_configs() -> None:
    args = build_parser({}).parse_args(["--model", "/m"])
    engine, options = build_configs(args)
    assert engine.batching == BatchingConfig()
    assert engine == EngineConfig(model="/m")
    assert (options.grpc_port, options.http_port, options.metrics_port) == (8001, 8000, 8002)
    assert options.shutdown_grace_s == 30.0
    documented = _documented_env_vars()
    for flag in FLAGS:
        if flag.default is not None and not isinstance(flag.default, bool):
            doc = documented[flag.env].strip("`")
            assert (
                float(doc) == float(flag.default)
                if isinstance(flag.default, int | float)
                else (doc == flag.default)
            ), flag.name


def test_environment_sets_defaults_and_flags_win() -> None:
    env = {
        "AUTOGLM_MODEL": "/models/glm",
        "AUTOGLM_MAX_BATCH_SIZE": "8",
        "AUTOGLM_MAX_QUEUE_DELAY_MS": "2.5",
        "AUTOGLM_TRUST_REMOTE_CODE": "true",
        "AUTOGLM_CHUNKED_PREFILL": "false",
        "AUTOGLM_MAX_MODEL_LEN": "4096",
        "AUTOGLM_SHUTDOWN_GRACE_SECONDS": "5",
        "AUTOGLM_LOG_FORMAT": "json",
    }
    args = build_parser(env).parse_args(["--max-batch-size", "16"])
    engine, options = build_configs(args)
    assert engine.model == "/models/glm"
    assert engine.trust_remote_code is True
    assert engine.max_model_len == 4096
    assert engine.batching.max_batch_size == 16  # the flag beats the variable
    assert engine.batching.max_queue_delay_ms == 2.5
    assert engine.batching.chunked_prefill is False
    assert options.shutdown_grace_s == 5.0
    assert args.log_format == "json"
    args = build_parser(env).parse_args(["--no-trust-remote-code"])
    assert args.trust_remote_code is False


@pytest.mark.parametrize(
    ("env", "argv", "needle"),
    [
        ({}, [], "--model"),
        ({"AUTOGLM_MODEL": "/m", "AUTOGLM_MAX_BATCH_SIZE": "lots"}, [], "AUTOGLM_MAX_BATCH_SIZE"),
        ({"AUTOGLM_MODEL": "/m", "AUTOGLM_DTYPE": "int3"}, [], "AUTOGLM_DTYPE"),
        ({"AUTOGLM_MODEL": "/m"}, ["--dtype", "int3"], "--dtype"),
        ({"AUTOGLM_MODEL": "/m"}, ["--grpc-port", "x"], "--grpc-port"),
        (
            {"AUTOGLM_MODEL": "/m", "AUTOGLM_TRUST_REMOTE_CODE": "maybe"},
            [],
            "AUTOGLM_TRUST_REMOTE_CODE",
        ),
    ],
)
def test_bad_values_are_usage_errors(
    env: dict[str, str], argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser(env).parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_config_errors_name_the_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "autoglm_server", "--model", "/m", "--max-batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT / "tests",
    )
    assert proc.returncode == 2
    assert "--max-batch-size" in proc.stderr


def test_json_log_lines() -> None:
    record = logging.LogRecord("autoglm", logging.INFO, __file__, 1, "ready in %s s", (1.5,), None)
    line = JsonFormatter().format(record)
    assert json.loads(line)["msg"] == "ready in 1.5 s"
    assert json.loads(line)["level"] == "info"
