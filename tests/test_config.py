"""TurboQuantConfig: presets and validation (invalid values raise ValueError naming the allowed ones)."""

from __future__ import annotations

import dataclasses

import pytest

from tq_hf import PRESETS, TurboQuantCache, TurboQuantConfig
from tq_hf.config import DEFAULT_PRESET, VALID_BACKENDS, VALID_BITS


def test_presets():
    assert {"4bit", "k4v3", "3bit", "k3v2", "8bit"} <= set(PRESETS)
    assert DEFAULT_PRESET in PRESETS
    assert (PRESETS["4bit"].key_bits, PRESETS["4bit"].value_bits) == (4, 4)
    assert (PRESETS["k4v3"].key_bits, PRESETS["k4v3"].value_bits) == (4, 3)
    assert (PRESETS["3bit"].key_bits, PRESETS["3bit"].value_bits) == (3, 3)
    assert (PRESETS["k3v2"].key_bits, PRESETS["k3v2"].value_bits) == (3, 2)
    assert PRESETS["k3v2"].skip_layers == (0, 1, -2, -1)
    assert (PRESETS["8bit"].key_bits, PRESETS["8bit"].value_bits) == (8, 8)
    for name, cfg in PRESETS.items():
        assert isinstance(cfg, TurboQuantConfig), name
        assert TurboQuantConfig.from_preset(name) == cfg
    # The default config is the default preset.
    assert TurboQuantConfig() == PRESETS[DEFAULT_PRESET]
    assert TurboQuantCache().config == PRESETS[DEFAULT_PRESET]


def test_config_is_frozen_and_replace_validates():
    cfg = TurboQuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.key_bits = 3
    assert cfg.replace(key_bits=3).key_bits == 3 and cfg.key_bits == 4
    with pytest.raises(ValueError, match="key_bits"):
        cfg.replace(key_bits=0)


def test_from_preset_overrides():
    cfg = TurboQuantConfig.from_preset("3bit", residual_length=16, seed=5)
    assert (cfg.key_bits, cfg.value_bits, cfg.residual_length, cfg.seed) == (3, 3, 16, 5)
    assert PRESETS["3bit"] == TurboQuantConfig(key_bits=3, value_bits=3)  # the preset itself is untouched


def test_from_preset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        TurboQuantConfig.from_preset("nope")
    msg = str(e.value)
    assert "nope" in msg
    for name in PRESETS:
        assert name in msg


@pytest.mark.parametrize("field", ("key_bits", "value_bits"))
@pytest.mark.parametrize("bad", (0, 9, True, False, -1, 2.5, "4", None))
def test_invalid_bits(field, bad):
    with pytest.raises(ValueError) as e:
        TurboQuantConfig(**{field: bad})
    msg = str(e.value)
    assert field in msg
    assert str(list(VALID_BITS)) in msg  # names the allowed values


@pytest.mark.parametrize("bits", VALID_BITS)
def test_valid_bits(bits):
    cfg = TurboQuantConfig(key_bits=bits, value_bits=bits)
    assert cfg.key_bits == cfg.value_bits == bits


@pytest.mark.parametrize("bad", (-1, 1.5, True, "64", None))
def test_invalid_residual_length(bad):
    with pytest.raises(ValueError, match="residual_length"):
        TurboQuantConfig(residual_length=bad)


def test_residual_length_zero_is_valid():
    assert TurboQuantConfig(residual_length=0).residual_length == 0


@pytest.mark.parametrize("bad", ("cuda", "TORCH", "", None))
def test_invalid_backend_names_allowed_values(bad):
    with pytest.raises(ValueError) as e:
        TurboQuantConfig(backend=bad)
    msg = str(e.value)
    assert "backend" in msg
    for name in VALID_BACKENDS:
        assert name in msg


@pytest.mark.parametrize("bad", ((0.5,), (True,), ("0",)))
def test_invalid_skip_layers(bad):
    with pytest.raises(ValueError, match="skip_layers"):
        TurboQuantConfig(skip_layers=bad)


def test_skip_layers_list_becomes_tuple():
    cfg = TurboQuantConfig(skip_layers=[0, -1])
    assert cfg.skip_layers == (0, -1)
    hash(cfg)  # frozen dataclass with a tuple: hashable


def test_cache_with_bad_preset_or_override_raises():
    with pytest.raises(ValueError, match="nope"):
        TurboQuantCache("nope")
    with pytest.raises(ValueError, match="key_bits"):
        TurboQuantCache(key_bits=0)
    with pytest.raises(ValueError, match="backend"):
        TurboQuantCache("4bit", backend="cuda")
    with pytest.raises(TypeError):
        TurboQuantCache(4)


def test_cache_accepts_config_preset_and_overrides():
    assert TurboQuantCache("k4v3").config == PRESETS["k4v3"]
    cfg = TurboQuantConfig(key_bits=5, value_bits=2)
    assert TurboQuantCache(cfg).config == cfg
    c = TurboQuantCache("8bit", residual_length=3)
    assert (c.config.key_bits, c.config.residual_length) == (8, 3)
