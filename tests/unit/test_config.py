"""Config files and ``--set`` overrides: parsing, layering over presets, round trips, errors."""

import pytest

from tedmoe.config import dump_run_config, from_dict, load_run_config, parse_override, to_dict


TOML = """
seed = 7
[model]
hidden_size = 64
[model.moe]
num_experts = 8
"""


def test_config_overrides_and_round_trip(tmp_path):
    assert parse_override("model.moe.top_k=1") == {"model": {"moe": {"top_k": 1}}}
    assert parse_override("train.precision=bf16") == {"train": {"precision": "bf16"}}
    (tmp_path / "c.toml").write_text(TOML)
    cfg = load_run_config(str(tmp_path / "c.toml"), "tiny", ["train.max_steps=9"])
    assert (cfg.seed, cfg.model.hidden_size, cfg.model.moe.hidden_size, cfg.model.moe.num_experts,
            cfg.train.max_steps) == (7, 64, 64, 8, 9)
    assert from_dict(to_dict(cfg)) == cfg
    assert "[model.moe]" in dump_run_config(cfg)
    with pytest.raises(ValueError, match="is not key=value"):
        parse_override("seed")
    with pytest.raises(ValueError, match="model is a table"):
        load_run_config(None, "tiny", ["model=3"])
