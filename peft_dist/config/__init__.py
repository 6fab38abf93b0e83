"""Run configuration: typed sections, YAML loading, overrides."""
from peft_dist.config.load import build_dataclass, config_to_dict, flatten, load_config_dict
from peft_dist.config.schema import (CheckpointConfig, ConfigError, DataConfig, DeepSpeedSection,
                                     ModelConfig, QuantizationConfig, RunConfig, TrackingConfig,
                                     TrainConfig, require)

__all__ = ["build_dataclass", "config_to_dict", "flatten", "load_config_dict", "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedSection",
           "ModelConfig", "QuantizationConfig", "RunConfig", "TrackingConfig", "TrainConfig", "require"]
