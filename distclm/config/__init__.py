"""One typed config tree for every distclm command, and the one way settings reach it.

    tree.py    the sections (data, model, lora, train, eval, gen, log, run): defaults, `--help` text, choices
    parse.py   defaults < `--preset=NAME` < `--config FILE.yaml` < `--section.key=value`, each value checked
               where it is set (errors name the flag or file); the command-line splitter; `--help` rows
"""

from distclm.config.parse import (
    FALSE,
    PRESETS,
    TRUE,
    apply,
    base_type,
    bool_fields,
    build_config,
    closest_key,
    coerce,
    flatten,
    help_lines,
    load_yaml,
    parse_bool,
    split_args,
    to_yaml,
    validate,
)
from distclm.config.tree import (
    SECTIONS,
    Config,
    DataConfig,
    EvalConfig,
    GenConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    PlanConfig,
    RunConfig,
    TrainConfig,
    field_specs,
    num_workers,
)

__all__ = ["FALSE", "PRESETS", "SECTIONS", "TRUE", "Config", "DataConfig", "EvalConfig", "GenConfig", "LogConfig", "LoraConfig",
           "ModelConfig", "PlanConfig", "RunConfig", "TrainConfig", "apply", "base_type", "bool_fields", "build_config",
           "closest_key", "coerce", "field_specs", "flatten", "help_lines", "load_yaml", "num_workers", "parse_bool",
           "split_args", "to_yaml", "validate"]
