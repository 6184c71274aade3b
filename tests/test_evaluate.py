"""tq_hf.evaluate: teacher-forced decode metrics, passkey prompts, table/CSV/JSON, the CLI (tiny settings)."""

from __future__ import annotations

import csv
import io
import json
import pathlib

import pytest
import torch

from tq_hf import evaluate as ev
from tq_hf.models import ByteTokenizer, tiny_llama
from tq_hf.train import eval_texts

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32}


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama(seed=0, **SMALL)
    return model, tok


@pytest.fixture(scope="module")
def texts():
    return eval_texts(n_bytes=2000)[:3]


@pytest.fixture(scope="module")
def result(tiny, texts):
    model, tok = tiny
    return ev.evaluate(model, tok, texts, ["4bit", "8bit"], seq_len=48, prefix_len=16, residual_length=4,
                       passkey_lengths=(48,), passkey_depths=(0.2, 0.8), passkey_trials=2, log=None)


def test_rows_and_reference(result):
    names = [r["name"] for r in result["rows"]]
    assert names == ["fp32 DynamicCache", "bf16 DynamicCache", "4bit", "4bit no-centring", "8bit", "8bit no-centring"]
    ref = result["rows"][0]
    assert ref["kl"] == 0 and ref["top1"] == 1 and ref["ppl_delta_pct"] == 0
    # a random-weight model has few steps with a clear winner (reference top-1 - top-2 >= 0.1), maybe none
    clear = result["settings"]["clear_steps"]
    assert 0 <= clear <= result["settings"]["scored_tokens"] and ref["top1_clear"] == (1 if clear else None)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["4bit"]["centring"] is True and rows["4bit no-centring"]["centring"] is False
    assert rows["4bit"]["key_bits"] == 4 and rows["8bit"]["value_bits"] == 8
    assert rows["4bit"]["residual_length"] == 4 and rows["4bit"]["tq_layers"] == 2
    # Quantization shows, and 8 bits are much closer to the reference than 4.
    assert rows["4bit"]["kl"] > 0 and rows["8bit"]["kl"] < rows["4bit"]["kl"] / 10
    for r in result["rows"]:
        assert r["ppl"] > 1 and 0 <= r["top1"] <= 1 and r["kl"] >= 0 and (r["top1_clear"] is None) == (not clear)
        assert set(r["passkey_by_length"]) == {48}
        ok = r["passkey_retrieved"][48]  # 2 depths x 2 trials, consistent with the accuracy
        assert len(ok) == 4 and all(isinstance(o, bool) for o in ok) and sum(ok) / 4 == r["passkey_by_length"][48]
        ref_ok = ref["passkey_retrieved"][48]  # prompt by prompt against the reference
        assert r["passkey_lost"] == sum(a and not b for a, b in zip(ref_ok, ok))
        assert r["passkey_gained"] == sum(b and not a for a, b in zip(ref_ok, ok))
        assert r["passkey_p"] == ev.sign_test_p(r["passkey_lost"], r["passkey_gained"])
    assert (ref["passkey_lost"], ref["passkey_gained"], ref["passkey_p"]) == (0, 0, 1.0)
    assert result["settings"]["scored_tokens"] == 3 * (48 - 1 - 16)
    assert result["settings"]["device_name"]  # the GPU model (or CPU) next to the device string


def test_sign_test_p():
    """Exact two-sided sign test: 2 P(X <= min) for X ~ Binomial(lost + gained, 1/2), capped at 1."""
    assert ev.sign_test_p(0, 0) == 1.0 and ev.sign_test_p(3, 3) == 1.0
    assert ev.sign_test_p(5, 2) == ev.sign_test_p(2, 5) == 2 * (1 + 7 + 21) / 2**7  # 0.453
    assert ev.sign_test_p(6, 0) == 2 / 2**6 and ev.sign_test_p(1, 0) == 1.0


def test_window_covering_everything_equals_reference(tiny, texts):
    # A full-precision window longer than the sequence: nothing is quantized, nothing changes.
    model, tok = tiny
    res = ev.evaluate(model, tok, texts, ["3bit"], seq_len=40, prefix_len=8, residual_length=64,
                      centring_ablation=False, bf16_row=False, passkey=False, log=None)
    row = res["rows"][1]
    assert row["name"] == "3bit" and row["kl"] < 1e-6 and row["top1"] == 1 and row["top1_clear"] in (1, None)
    assert abs(row["ppl_delta_pct"]) < 1e-4


def test_texts_too_short_are_dropped_or_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="seq_len"):
        ev.evaluate(model, tok, ["short"], ["4bit"], seq_len=40, prefix_len=8, passkey=False, log=None)
    with pytest.raises(ValueError, match="prefix_len"):
        ev.evaluate(model, tok, ["x" * 100], ["4bit"], seq_len=40, prefix_len=39, passkey=False, log=None)


def test_passkey_prompts_shape():
    tok = ByteTokenizer()
    filler = "\n".join(eval_texts(n_bytes=3000))
    ps = ev.passkey_prompts(tok, filler, 200, depths=(0.1, 0.5, 0.9), trials=3, seed=1)
    assert len(ps) == 9
    for p in ps:
        assert len(p["context"]) + len(p["query"]) == p["length"] == 200
        assert p["context"][0] == tok.bos_token_id
        text = tok.decode(p["context"])
        assert f'\npasskey = "{p["key"]}"\n' in text and text.count("passkey =") == 1
        assert tok.decode(p["query"]) == '\npasskey = "'
        assert len(p["key"]) == 6 and set(p["key"]) <= set(ev.PASSKEY_ALPHABET)
    # Deeper needles sit later in the prompt.
    pos = [tok.decode(p["context"]).index("passkey =") for p in ps]
    assert sum(pos[:3]) < sum(pos[3:6]) < sum(pos[6:])
    # Seeded: the same call gives the same prompts.
    assert ps == ev.passkey_prompts(tok, filler, 200, depths=(0.1, 0.5, 0.9), trials=3, seed=1)


def test_table_and_files(result, tmp_path):
    table = ev.format_table(result)
    lines = table.splitlines()
    assert len(lines) == 2 + len(result["rows"]) and "passkey@48" in lines[0]
    jpath, cpath = ev.save_results(result, str(tmp_path))
    assert json.loads(pathlib.Path(jpath).read_text())["rows"][2]["name"] == "4bit"
    rows = list(csv.DictReader(io.StringIO(pathlib.Path(cpath).read_text())))
    assert [r["name"] for r in rows] == [r["name"] for r in result["rows"]]
    assert "passkey@48" in rows[0] and "kl" in rows[0]


def test_cli_on_reference_model(tmp_path, capsys):
    rc = ev.main(["--presets", "4bit", "--seq-len", "72", "--prefix-len", "40", "--passkey-lengths", "64",
                  "--passkey-depths", "0.5", "--passkey-trials", "1", "--no-bf16-row", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 4bit no-centring |" in out and "fp32 DynamicCache" in out
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["settings"]["model"] == "tq_hf reference model" and len(res["rows"]) == 3
    assert (tmp_path / "eval.csv").exists()


def test_cli_unknown_preset(capsys):
    assert ev.main(["--presets", "4bit,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--residual-length", "-1"], "residual_length must be an int >= 0"),
    (["--seq-len", "10", "--prefix-len", "32"], "--prefix-len must be in"),
    (["--passkey-depths", "1.5"], "--passkey-depths must lie in"),
    (["--texts", "/nonexistent/file.txt"], "No such file"),
] + ([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else []))
def test_cli_bad_arguments_are_one_line_errors(capsys, args, message):
    assert ev.main(["--presets", "4bit", "--no-passkey", "--no-centring-ablation", "--no-bf16-row", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "Loading weights" not in err  # refused before loading


def test_package_cli_names_its_own_command(capsys):
    """`python -m tq_hf eval ...` names itself so in its usage line (and in eval.json's recorded command)."""
    from tq_hf.__main__ import main

    with pytest.raises(SystemExit):
        main(["eval", "--seq-len", "x"])
    assert capsys.readouterr().err.startswith("usage: python -m tq_hf eval")


def test_default_configs():
    rows = ev.default_configs(["k4v3"], centring_ablation=True, residual_length=0, backend="torch")
    assert [r.name for r in rows] == ["k4v3", "k4v3 no-centring"]
    assert rows[0].config.residual_length == 0 and rows[1].config.backend == "torch"
    assert not rows[1].config.key_mean_centering
    assert len(ev.default_configs(None, centring_ablation=False)) == len(__import__("tq_hf").PRESETS)
    # configs get names of their own (rows are keyed by name: two "custom" rows once overwrote each other)
    from tq_hf import TurboQuantConfig

    rows = ev.default_configs([TurboQuantConfig(seed=1), "4bit", TurboQuantConfig(seed=2)], centring_ablation=False)
    assert [r.name for r in rows] == ["custom 1", "4bit", "custom 2"] and rows[2].config.seed == 2
    with pytest.raises(ValueError, match="name a preset twice"):
        ev.default_configs(["4bit", "3bit", "4bit"])


def test_qjl_ablation_rows():
    from tq_hf.evaluate import default_configs

    rows = default_configs(["4bit", "2.5bit"], centring_ablation=False, qjl_ablation=True)
    assert [r.name for r in rows] == ["4bit", "4bit + QJL keys", "2.5bit"]  # no QJL over split codes
    assert rows[1].config.key_qjl and rows[1].config.key_bits == 4
