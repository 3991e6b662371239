"""The tensor-parallel plan is data that covers the whole model: every parameter belongs to a
module the plan splits or declares replicated, so a new module cannot be left out silently."""

import pytest

from bigtrain.config import MoEConfig
from bigtrain.model import Llama
from bigtrain.parallel.layout import TP_PLAN, EnterRegion, Replicate, Split, in_moe, tp_split_dim
from tests.helpers import small_model_config


def _kinds(module_name: str) -> set[type]:
    return {type(entry) for entry in TP_PLAN.get(module_name, ())}


@pytest.mark.parametrize("shape", [{}, {"tie_embeddings": True}, {"qk_norm": True, "moe": MoEConfig(experts=4, shared_experts=1)}])
def test_every_parameter_is_split_or_declared_replicated(shape):
    model = Llama(small_model_config(n_heads=4, n_kv_heads=2, **shape), device="meta")
    for name, _ in model.named_parameters(remove_duplicate=False):
        if in_moe(name):  # a Mixture-of-Experts feed-forward stays whole
            assert tp_split_dim(name) is None
            continue
        kinds = _kinds(name.split(".")[-2])
        assert (Split in kinds) != (Replicate in kinds), f"{name}: the plan must split it or declare it replicated"


def test_every_plan_entry_names_a_module_of_the_model():
    model = Llama(small_model_config(n_heads=4, n_kv_heads=2, qk_norm=True), device="meta")
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    assert set(TP_PLAN) <= names, sorted(set(TP_PLAN) - names)


def test_regions_are_entered_where_column_parallel_work_starts():
    entered = {name for name, entries in TP_PLAN.items() if any(isinstance(e, EnterRegion) for e in entries)}
    assert entered == {"self_attn", "mlp", "lm_head"}
