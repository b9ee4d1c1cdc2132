"""The one config tree: every field jaxlm reads, its default, and what it means.

Presets in `configs/` start from `base_config()` and override fields; the CLI overrides any field
with `--config.<section>.<field>=value`. `validate(config)` runs once at start-up and raises
`ConfigError` naming the field and the fix. A field that is not defined here is an error, so a
typo never silently falls back to a default. The fields and their meaning live in
jaxlm/config/fields.py (the model section in jaxlm/config/model_fields.py), the checks in
jaxlm/config/checks.py (MoE and MLA fields in jaxlm/config/sparse_checks.py, LoRA and post-training
fields in jaxlm/config/posttrain_checks.py); import them from here.
"""

from jaxlm.config.checks import (LOGICAL_AXES, MESH_AXES, RUN_DIR_SCHEMES, check_location,
                                 check_overrides, flat_fields, is_url, layer_kinds, parse_rules,
                                 unknown_field_error, validate, with_vocab_size)
from jaxlm.config.posttrain_checks import LORA_TARGETS, lora_targets, rows_per_example
from jaxlm.config.fields import ConfigDict, ConfigError, base_config
from jaxlm.config.sparse_checks import moe_layers

__all__ = ["ConfigDict", "ConfigError", "LOGICAL_AXES", "LORA_TARGETS", "MESH_AXES",
           "RUN_DIR_SCHEMES", "base_config", "check_location", "check_overrides", "flat_fields",
           "is_url", "layer_kinds", "lora_targets", "moe_layers", "parse_rules", "rows_per_example",
           "unknown_field_error", "validate", "with_vocab_size"]
