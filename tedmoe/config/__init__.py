"""Configuration: typed dataclasses with a docstring per field (``schema``), their type and range
checks read off the annotations (``validation``), and TOML / ``--set`` loading (``loader``)."""

from tedmoe.config.loader import (apply_values, dump_run_config, from_dict, load_model_config, load_run_config,
                                  model_config_from_dict, parse_override, to_dict, upgrade)
from tedmoe.config.schema import (PRESETS, CompressConfig, DataConfig, ModelConfig, MoEConfig, ParallelConfig, RunConfig, TrainConfig,
                                  check_batch, preset)

__all__ = ["PRESETS", "CompressConfig", "DataConfig", "ModelConfig", "MoEConfig", "ParallelConfig", "RunConfig", "TrainConfig",
           "apply_values", "check_batch", "dump_run_config", "from_dict", "load_model_config", "load_run_config",
           "model_config_from_dict", "parse_override", "preset", "to_dict", "upgrade"]
