"""Policies: the YAML format, its loader and the deterministic validator."""

from atm.policies._loader import PolicyError, load_policy, parse_policy, policy_json_schema, preset_names
from atm.policies._schema import AUX_ROLES, ActionRule, Limits, LLMSettings, ParamRule, Policy, Window
from atm.policies._validator import (
    COUNTED,
    COUNTED_DRY,
    L2_FROM_ZERO_MAX,
    L2_MAX_FACTOR,
    DecisionContext,
    available_actions,
    available_choices,
    blocked,
    check,
    choices,
    l2_choices,
    max_factor,
    undo_value,
    unsettled,
)

__all__ = [
    "AUX_ROLES",
    "COUNTED",
    "COUNTED_DRY",
    "L2_FROM_ZERO_MAX",
    "L2_MAX_FACTOR",
    "ActionRule",
    "DecisionContext",
    "LLMSettings",
    "Limits",
    "ParamRule",
    "Policy",
    "PolicyError",
    "Window",
    "available_actions",
    "available_choices",
    "blocked",
    "check",
    "choices",
    "l2_choices",
    "load_policy",
    "max_factor",
    "parse_policy",
    "policy_json_schema",
    "preset_names",
    "undo_value",
    "unsettled",
]
