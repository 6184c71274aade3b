"""`python -m tq_hf demo`: the table it prints and its one-line errors (exit code 2)."""

from __future__ import annotations

import pytest
from test_analysis import save_local_checkpoint
from transformers import BertConfig

from tq_hf.__main__ import main


def run(capsys, *args):
    rc = main(["demo", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_builtin_model(capsys):
    rc, out, err = run(capsys, "--max-new-tokens", "3", "--preset", "k4v3")
    assert rc == 0, err
    assert "trained reference model" in out
    header = next(line for line in out.splitlines() if line.startswith("cache"))
    assert header.split() == ["cache", "bytes", "held", "vs", "dense", "tokens/s", "greedy", "agreement"]
    tq_row = next(line for line in out.splitlines() if line.startswith("TurboQuant k4v3"))
    assert "x" in tq_row and "tokens identical" in tq_row
    assert "DynamicCache:" in out and "TurboQuant:" in out


def test_demo_random_weights(capsys):
    rc, out, err = run(capsys, "--model", "random", "--max-new-tokens", "2")
    assert rc == 0, err
    assert "built-in tiny Llama (random weights, seed 0)" in out and "noise" in out


def test_demo_local_checkpoint(capsys, tmp_path):
    save_local_checkpoint(tmp_path)
    rc, out, err = run(capsys, "--model", str(tmp_path), "--max-new-tokens", "2", "--prompt", "hello " * 20,
                       "--device", "cpu")
    assert rc == 0, err
    assert f"{tmp_path.name} (llama)" in out and "TurboQuant 4bit" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--preset", "5bit"), "unknown preset '5bit'; valid presets: 2.5bit, 3.5bit, 3bit, 4bit, 8bit, k3v2, k4v3"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
        (("--model", "/nonexistent/checkpoint"), "--model '/nonexistent/checkpoint' does not exist"),
    ],
)
def test_demo_usage_errors(capsys, args, message):
    rc, _out, err = run(capsys, *args)
    assert rc == 2
    assert err.startswith("python -m tq_hf demo: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_demo_unsupported_model_type(capsys, tmp_path):
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    rc, _out, err = run(capsys, "--model", str(tmp_path))
    assert rc == 2 and "is an encoder (bert" in err and "decoder-only causal language models" in err
    assert len(err.strip().splitlines()) == 1


def test_demo_without_command(capsys):
    assert main([]) == 2
