"""Everything a run is configured by, in one place:

- run.py          the typed run config (one dataclass per section) and load_config (YAML + command line)
- quant.py        the `quant:` section: formats per module (default + glob overrides) and the GPTQ options
- recipe.py       resolving that section against a model's module names (which rule, which format, why)
- recipe_file.py  JSON/YAML recipe files (`--recipe FILE`, `quant: FILE`) in the specification's form
- schema.py       the generic dataclass <- YAML builder: types, unknown keys with suggestions, duplicate keys
- cli_help.py     `--help` and flag checks generated from the dataclasses (never written twice)

Nothing here imports torch: `--help` and config errors stay instant.
"""
from alphaquant.config.quant import GptqConfig, QuantConfig, QuantOverride, QuantRule
from alphaquant.config.run import (CalibrationConfig, Config, CsvConfig, EvalConfig, LoggingConfig, ModelConfig,
                                   OutputConfig, TrainerConfig, WandbConfig, load_config, parse_overrides,
                                   read_config_file)

__all__ = ["CalibrationConfig", "Config", "CsvConfig", "EvalConfig", "GptqConfig", "LoggingConfig", "ModelConfig",
           "OutputConfig", "QuantConfig", "QuantOverride", "QuantRule", "TrainerConfig", "WandbConfig", "load_config",
           "parse_overrides", "read_config_file"]
