"""Config files and ``--set`` overrides: parsing, layering over presets, round trips, errors."""

import pytest

from tedmoe.config import (ModelConfig, MoEConfig, RunConfig, dump_run_config, from_dict, load_run_config,
                           model_config_from_dict, parse_override, preset, to_dict)


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
    assert (cfg.seed, cfg.model.hidden_size, cfg.model.moe.num_experts, cfg.train.max_steps) == (7, 64, 8, 9)
    assert from_dict(to_dict(cfg)) == cfg
    assert "[model.moe]" in dump_run_config(cfg)
    with pytest.raises(ValueError, match="is not key=value"):
        parse_override("seed")
    with pytest.raises(ValueError, match="model is a table"):
        load_run_config(None, "tiny", ["model=3"])


def test_nested_defaults_are_fresh_objects():
    a, b = RunConfig(), RunConfig()
    a.model.moe.top_k = 1
    assert b.model.moe.top_k == 2 and ModelConfig().moe == MoEConfig()


def test_the_removed_moe_width_key(tmp_path):
    """The experts take ``model.hidden_size``: a TOML that still sets ``model.moe.hidden_size`` is
    refused naming why; a config written by an older tedmoe (checkpoint meta, model_config.json)
    loads when the two widths agree."""
    (tmp_path / "old.toml").write_text("[model.moe]\nhidden_size = 64\n")
    with pytest.raises(ValueError, match=r"'model.moe.hidden_size' is no longer a setting: the experts' width"):
        load_run_config(str(tmp_path / "old.toml"), "tiny")
    old = to_dict(preset("tiny"))
    old["model"]["moe"]["hidden_size"] = old["model"]["hidden_size"]
    assert from_dict(old) == preset("tiny")
    assert model_config_from_dict(old["model"]) == preset("tiny").model
    old["model"]["moe"]["hidden_size"] = 7
    with pytest.raises(ValueError, match="no longer a setting"):
        from_dict(old)


def test_model_configs_saved_by_older_versions_compare_equal_to_todays():
    """A checkpoint's model config as JSON (tuples become lists) and one written before fields were
    added (head_dim, qk_norm, expert_counts, moe.residual) equal today's config: resume must see no
    difference, and a real difference is named."""
    import dataclasses
    import json

    from tedmoe.config import preset
    from tedmoe.config.loader import model_differences

    cfg = preset("tiny").model
    cfg.expert_counts = (4, 4)
    now = dataclasses.asdict(cfg)
    assert model_differences(json.loads(json.dumps(now)), now) == []
    old = json.loads(json.dumps(dataclasses.asdict(preset("tiny").model)))
    for key in ("head_dim", "qk_norm", "expert_counts"):
        del old[key]
    del old["moe"]["residual"]
    assert model_differences(old, dataclasses.asdict(preset("tiny").model)) == []
    assert model_differences(old, now) == ["expert_counts"]
