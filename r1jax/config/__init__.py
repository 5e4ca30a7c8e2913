"""Frozen, validated configs loaded from YAML, with dotted `key=value` overrides.

A leaf of r1jax: it imports only r1jax.errors and r1jax.plugins, never the code the configs drive.

    loader.py  FrozenDict, need, type checks, from_dict/to_dict, YAML with includes, overrides, load
    model.py   ModelConfig (DeepSeek-V2/V3) and DenseConfig (students), their HF config.json round trip
    mesh.py    MeshConfig, the mesh axes and the logical-axis rules
    tasks.py   TaskConfig: the built-in verifiable tasks (arithmetic, countdown, running_sum, sort_words)
    stages.py  data, training, GRPO, rejection, eval and pipeline configs; load_stage

Strategy names (moe_dispatch, remat_policy, packing, ...) are Literals here; the tables of functions
they choose between live beside the code and are checked against them with `check_names` at import.
"""

from r1jax.config.loader import (UNION_BUILDERS, Choice, FrozenDict, resolve_includes, apply_overrides,
                                 check_choice, check_names, from_dict, load, load_dict, names, need,
                                 parse_override, read_yaml, thaw, to_dict)
from r1jax.config.mesh import DCN_AXES, DEFAULT_RULES, MESH_AXES, MeshConfig
from r1jax.config.model import (DEEPSEEK_ARCHITECTURES, DENSE_ARCHITECTURES, DENSE_MODEL_TYPES, DENSE_ROPE_TYPES,
                                DTYPES, HF_MODEL_TYPES, MODEL_CONFIGS, DenseConfig, Dtype, ModelConfig,
                                MoeDispatch, RematPolicy, AttentionImpl, config_from_hf, load_model, model_from_dict)
from r1jax.config.stages import (STAGES, VERIFIER_NAMES, CheckpointConfig, DataConfig, DataKind, DistillConfig,
                                 EvalConfig, GRPOConfig, OptimizerConfig, Packing, PipelineConfig, RejectionConfig,
                                 RewardSpec, StageKind, StageSpec, TaskConfig, TrainConfig, VerifierName, load_stage)
from r1jax.config.tasks import TASK_NAMES, CountdownConfig, RunningSumConfig, SortWordsConfig, TaskName
from r1jax.errors import ConfigError

__all__ = [
    # loading
    "ConfigError", "FrozenDict", "thaw", "need", "from_dict", "to_dict", "parse_override", "apply_overrides",
    "read_yaml", "load_dict", "load", "UNION_BUILDERS",
    # strategy names
    "Choice", "names", "check_choice", "check_names", "Dtype", "DTYPES", "MoeDispatch", "RematPolicy", "AttentionImpl",
    "DataKind", "Packing", "StageKind", "VerifierName", "VERIFIER_NAMES",
    # models
    "ModelConfig", "DenseConfig", "HF_MODEL_TYPES", "DEEPSEEK_ARCHITECTURES", "DENSE_MODEL_TYPES",
    "DENSE_ARCHITECTURES", "DENSE_ROPE_TYPES", "MODEL_CONFIGS", "config_from_hf", "model_from_dict", "load_model",
    # mesh
    "MESH_AXES", "DCN_AXES", "DEFAULT_RULES", "MeshConfig",
    # stages
    "TaskConfig", "TaskName", "TASK_NAMES", "CountdownConfig", "RunningSumConfig", "SortWordsConfig", "DataConfig", "OptimizerConfig", "CheckpointConfig", "DistillConfig", "TrainConfig",
    "RewardSpec", "GRPOConfig", "RejectionConfig", "EvalConfig", "StageSpec", "PipelineConfig", "STAGES",
    "load_stage",
]
