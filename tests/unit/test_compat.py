"""One test per private library internal that `bigtrain.compat` relies on: each fails, naming the
internal, when an upgrade of DeepSpeed, mosaicml-streaming or torch removes or renames it.
(The distributed tests exercise them end to end; these say which one broke.)"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigtrain import compat


def assigns_attribute(cls: type, name: str) -> bool:
    """True when some method of `cls` (or a base) assigns `self.<name>`."""
    for klass in cls.__mro__[:-1]:  # not `object`
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.ctx, ast.Store):
                return True
    return False


def test_pipeline_engine_instruction_map():
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    instructions = getattr(PipelineEngine, "_INSTRUCTION_MAP", None)
    assert isinstance(instructions, dict), "PipelineEngine._INSTRUCTION_MAP is gone"
    assert {schedule.ForwardPass, schedule.BackwardPass, schedule.OptimizerStep} <= set(instructions)

    class Engine:
        _INSTRUCTION_MAP = dict(instructions)

    engine = Engine()
    compat.wrap_pipeline_instructions(engine, lambda kind, run: (kind, run))
    assert engine._INSTRUCTION_MAP[schedule.ForwardPass] == (schedule.ForwardPass, instructions[schedule.ForwardPass])


def test_partition_layers_is_deepspeeds_cut():
    assert compat.partition_layers([0, 1, 1, 1, 1, 0], 2) == [0, 3, 6]  # embedding + 2 blocks | 2 blocks + head


def test_pipeline_module_stage_range():
    from deepspeed.runtime.pipe.module import PipelineModule

    assert assigns_attribute(PipelineModule, "_local_start"), "PipelineModule._local_start is gone"
    assert assigns_attribute(PipelineModule, "_local_stop"), "PipelineModule._local_stop is gone"


def test_pipeline_module_grid_is_its_mpu():
    from deepspeed.runtime.pipe.module import PipelineModule

    assert assigns_attribute(PipelineModule, "_grid"), "PipelineModule._grid is gone"
    assert "return self._grid" in inspect.getsource(PipelineModule.mpu), "PipelineModule.mpu() no longer returns _grid"


@pytest.mark.parametrize("path", [
    "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
    "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
    "deepspeed.runtime.bf16_optimizer.BF16_Optimizer",
    "deepspeed.runtime.fp16.fused_optimizer.FP16_Optimizer",
])
def test_optimizer_wrappers_keep_the_global_grad_norm(path):
    module, name = path.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert assigns_attribute(cls, "_global_grad_norm"), f"{name}._global_grad_norm is gone"


def test_engine_fp32_clipping_hook():
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert callable(getattr(DeepSpeedEngine, "clip_fp32_gradients", None)), "DeepSpeedEngine.clip_fp32_gradients is gone"
    assert "self.clip_fp32_gradients()" in inspect.getsource(DeepSpeedEngine), \
        "DeepSpeedEngine no longer calls self.clip_fp32_gradients()"


def test_fp16_loss_scale():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    assert assigns_attribute(FP16_Optimizer, "loss_scale_config"), "FP16_Optimizer.loss_scale_config is gone"

    class Config:
        cur_scale = 1024.0

    class Wrapper:
        loss_scale_config = Config()

    assert compat.fp16_loss_scale(Wrapper()) == 1024.0
    assert compat.fp16_loss_scale(object()) is None


def test_grad_norm_reads_the_model_parallel_marks():
    from deepspeed.runtime import utils

    source = inspect.getsource(utils)
    assert "model_parallel" in source and "tensor_model_parallel" in source, \
        "DeepSpeed's gradient norm no longer reads param.model_parallel / param.tensor_model_parallel"
    p = torch.nn.Parameter(torch.zeros(2, 2))
    compat.mark_tensor_parallel(p, 1)
    assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, 1, 1)
    assert utils.is_model_parallel_parameter(p)


def test_zero_optimizer_state_internals():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert assigns_attribute(DeepSpeedZeroOptimizer_Stage3, "fp32_partitioned_groups_flat"), \
        "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat is gone"
    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        assert callable(getattr(cls, "_lazy_init_hp_params_optimizer_state", None)), \
            f"{cls.__name__}._lazy_init_hp_params_optimizer_state is gone"
    from deepspeed.runtime.zero import partition_parameters

    source = inspect.getsource(partition_parameters)
    assert "ds_id" in source and "ds_shape" in source, "ZeRO-3 parameters no longer carry ds_id / ds_shape"


def test_zero_flat_layout_internals():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for name in ("round_robin_bit16_offsets", "round_robin_bit16_groups", "partition_size", "real_dp_process_group"):
        assert assigns_attribute(DeepSpeedZeroOptimizer, name), f"DeepSpeedZeroOptimizer.{name} is gone"
    assert compat.zero_flat_layout(SimpleNamespace(), 0) is None


def test_zero_to_fp32_functions():
    from deepspeed.utils import zero_to_fp32

    for name in ("parse_model_states", "get_model_state_files", "get_optim_files", "parse_optim_states",
                 "_get_fp32_state_dict_from_zero2_checkpoint", "_get_fp32_state_dict_from_zero3_checkpoint",
                 "to_torch_tensor"):
        assert callable(getattr(zero_to_fp32, name, None)), f"deepspeed.utils.zero_to_fp32.{name} is gone"


def test_deepspeed_checkpoint_classes_import():
    assert len(compat.deepspeed_checkpoint_classes()) == 4


def test_streaming_partition_world():
    from streaming import StreamingDataset
    from streaming.base.world import World

    assert "_parallel_rank_world" in inspect.getsource(StreamingDataset), \
        "StreamingDataset._parallel_rank_world is gone"

    class Dataset:
        pass

    dataset = Dataset()
    compat.partition_streaming_by(dataset, dp_rank=1, dp_size=2)
    world = dataset._parallel_rank_world
    assert isinstance(world, World) and (world.num_nodes, world.node, world.rank) == (2, 1, 1)


def test_replaced_torch_load_is_restored(tmp_path: Path):
    original = torch.load
    with compat.replaced_torch_load(lambda *a, **k: "replaced"):
        assert torch.load(tmp_path / "x.pt") == "replaced"
    assert torch.load is original


def test_default_group_timeout():
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    assert hasattr(c10d, "default_pg_timeout") and hasattr(c10d, "default_pg_nccl_timeout"), \
        "torch.distributed's default_pg_timeout / default_pg_nccl_timeout are gone"
    before = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    try:
        compat.set_default_group_timeout(timedelta(seconds=42))
        assert c10d._get_default_timeout("gloo") == timedelta(seconds=42)
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = before


def test_lm_eval_task_yaml_reader(tmp_path: Path):
    from lm_eval.tasks import _yaml_loader

    assert callable(getattr(_yaml_loader, "load_yaml", None)), "lm_eval.tasks._yaml_loader.load_yaml is gone"
    (tmp_path / "base.yaml").write_text("output_type: multiple_choice\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "utils.py").write_text("def process(docs):\n    return docs\n")
    (tmp_path / "task.yaml").write_text("include: base.yaml\ntask: t\nprocess_docs: !function utils.process\n")
    cfg = compat.read_task_yaml(tmp_path / "task.yaml")
    assert cfg["task"] == "t" and cfg["output_type"] == "multiple_choice"  # the include is merged
    assert cfg["process_docs"]([1]) == [1]  # and !function imported


def test_fake_process_group_stands_in_for_a_large_world():
    import torch.distributed as dist

    compat.init_fake_process_group(rank=37, world_size=64)
    try:
        assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (37, 64, "fake")
        group = dist.new_group([5, 37])
        assert dist.get_rank(group) == 1
        out = torch.empty(64 * 2)
        dist.all_gather_single(out, torch.ones(2))  # returns at once: no peer is asked
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_expert_groups_are_found_under_their_name():
    import torch.distributed as dist
    from deepspeed.utils import groups

    compat.init_fake_process_group(rank=1, world_size=4)
    try:
        ep, expert_data = dist.new_group([0, 1]), dist.new_group([1, 3])
        compat.register_expert_groups("ep_size_2", ep, expert_data)
        assert groups._get_expert_parallel_group_dict()["ep_size_2"] is ep  # what DeepSpeedEngine reads
        assert groups._get_expert_data_parallel_group_dict()["ep_size_2"] is expert_data
        assert groups._EXPERT_DATA_PARALLEL_GROUP_RANKS["ep_size_2"] == [1, 3]
    finally:
        for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP,
                      groups._EXPERT_PARALLEL_GROUP_RANKS, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            table.pop("ep_size_2", None)
        dist.destroy_process_group()


def test_in_backward_sees_the_autograd_engine():
    seen = []
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda grad: seen.append(compat.in_backward()) or grad)
    (x * 2).sum().backward()
    assert seen == [True] and not compat.in_backward()


def test_zero_buffer_internals_the_simulation_measures():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, names in ((DeepSpeedZeroOptimizer_Stage3, ("grad_partitions_flat_buffer", "ipg_buckets",
                                                        "fp32_partitioned_groups_flat")),
                       (DeepSpeedZeroOptimizer, ("averaged_gradients", "ipg_buckets", "single_partition_of_fp32_groups")),
                       (BF16_Optimizer, ("fp32_groups_gradients_flat", "fp32_groups_flat_partition"))):
        for name in names:
            assert assigns_attribute(cls, name), f"{cls.__name__}.{name} is gone"
    assert ZeroParamStatus.AVAILABLE.name == "AVAILABLE"
    buckets = {torch.bfloat16: SimpleNamespace(buffer=[torch.zeros(2), torch.zeros(2)]),
               torch.float32: SimpleNamespace(buffer=torch.zeros(5))}
    wrapper = SimpleNamespace(fp32_groups_gradients_flat=[torch.zeros(3)], ipg_buckets=buckets,
                              fp32_groups_flat_partition=[torch.zeros(4)])
    assert [t.numel() for t in compat.gradient_buffers(wrapper)] == [3]
    assert [t.numel() for t in compat.bucket_buffers(wrapper)] == [2, 2, 5]
    assert [t.numel() for t in compat.master_partitions(wrapper)] == [4]


def test_deepspeed_checkpoint_engine_save_is_routed_and_restored(tmp_path: Path):
    """DeepSpeed's engines write through `checkpoint_engine.save` and ask `preserves_storage_sharing`
    before cloning; both are replaced within the block only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from bigtrain.checkpoint.writes import Staged

    checkpoint_engine = TorchCheckpointEngine()
    engine = SimpleNamespace(checkpoint_engine=checkpoint_engine)
    writes = Staged()
    with compat.checkpoint_files_through(engine, writes):
        checkpoint_engine.save({"w": torch.ones(2)}, str(tmp_path / "x.pt"))
        assert checkpoint_engine.preserves_storage_sharing() is False
    assert not (tmp_path / "x.pt").exists()  # staged, not written
    writes.flush()
    assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.ones(2))
    assert checkpoint_engine.preserves_storage_sharing() is True
    assert "save" not in checkpoint_engine.__dict__


def test_safetensors_shared_names_match_save_model(tmp_path: Path):
    import safetensors.torch

    model = torch.nn.Linear(2, 2)
    model.register_parameter("tied", model.weight)
    kept = compat.shared_tensor_names(model.state_dict())
    safetensors.torch.save_model(model, str(tmp_path / "m.safetensors"))
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert set(f.keys()) == {"bias", *kept}
        assert f.metadata() == {name: k for k, names in kept.items() for name in names}
