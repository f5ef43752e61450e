"""The `bloom-jax` command: help, presets, the forward job, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from bloom_jax.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("presets", "forward", "convert", "export", "plan"):
        assert command in out


def test_presets_print_published_parameter_counts(capsys):
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "params=176,247,271,424" in lines["bloom-176b"]
    assert "params=559,214,592" in lines["bloom-560m"]


def test_forward_of_a_random_tiny_model(capsys):
    assert main(["forward", "bloom-tiny", "--batch", "2", "--seq", "16"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["weights"] == "random init" and result["params"] == 165_760
    # Init std 0.02 gives near-uniform predictions: the loss is log V to within a few hundredths.
    assert result["next_token_loss"] == pytest.approx(math.log(1024), abs=0.1)
    assert "compiling" in captured.err  # logs on stderr, the result alone on stdout


@pytest.mark.parametrize("argv, message", [
    (["forward", "--batch", "0"], "--batch: must be at least 1"),
    (["forward", "--dtype", "int8"], "unsupported dtype 'int8'"),
    (["forward", "no-such-model"], "no such directory"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["plan", "--model", "bloom-tiny", "--mesh", "data=2", "--device", "tpu9"], "unknown device"),
])
def test_mistakes_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bloom-jax: error:") and message in err[0]
