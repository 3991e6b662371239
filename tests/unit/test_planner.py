"""The memory/layout planner against hand computations, and `bigtrain info`."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from bigtrain.cli import main
from bigtrain.config import ModelConfig, MoEConfig, load_config
from bigtrain.model import count_params
from bigtrain.parallel.planner import (
    Layout,
    activation_bytes,
    checkpoint_staging_bytes,
    config_layout,
    fits,
    memory_plan,
    stage_expert_params,
    stage_params,
    suggest,
)

# 4 layers, d=64, 4 heads, 2 kv heads (head_dim 16), ffn 256, vocab 512, untied
CONFIGS = Path(__file__).parents[2] / "configs"
SHAPE = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_seq_len=32)
# per block: q, o 64·64; k, v 64·32; SwiGLU 3·64·256; 2 norms of 64 → 8192 + 4096 + 49152 + 128 = 61,568
ROPE = 2 * SHAPE.max_seq_len * SHAPE.head_dim * 4  # one fp32 cos/sin pair per rank
BLOCK, N = 61_568, 512 * 64 + 4 * 61_568 + 64 + 512 * 64  # embedding + blocks + final norm + head
# the same with 4 MoE blocks of 8 experts (top 2) 64 wide: attention 12,288 + norms 128 + router 64·8
# + 8 · 3·64·64 = 111,232 per block, of which 98,304 routed-expert weights
MOE = replace(SHAPE, moe=MoEConfig(experts=8, top_k=2, ffn_hidden=64))
EXPERTS, MOE_N = 4 * 98_304, 512 * 64 + 4 * 111_232 + 64 + 512 * 64


def test_stage_params_by_hand():
    assert count_params(SHAPE).total == N == 311_872
    assert stage_params(SHAPE, tp=1, pp=1) == N
    # tp=2 halves every matmul and the embedding; norms stay whole
    assert stage_params(SHAPE, tp=2, pp=1) == 512 * 32 + 4 * ((BLOCK - 128) // 2 + 128) + 512 * 32 + 64
    # pp=2: 2 blocks per stage; stage 0 has the embedding, the last the head and norm (the larger)
    assert stage_params(SHAPE, tp=1, pp=2) == 512 * 64 + 64 + 2 * BLOCK


@pytest.mark.parametrize("zero, params, grads, optimizer", [
    (0, 2 * N, (2 + 4) * N, 12 * N),  # FP16_Optimizer: fp32 master, moments, fp32 gradient copy
    (1, 2 * N, 2 * N, 12 * N / 4),  # full gradients; master + moments split over dp=4
    (2, 2 * N, (2 + 4) * N / 4, 12 * N / 4),  # bf16 partition + its fp32 copy at the step
    (3, 2 * N / 4, (2 + 4) * N / 4, 12 * N / 4),
])
def test_memory_per_zero_stage_by_hand(zero, params, grads, optimizer):
    plan = memory_plan(SHAPE, 32, "bf16", Layout(dp=4, zero=zero, micro_batch=2))
    assert (plan.params, plan.gradients, plan.optimizer) == pytest.approx((params, grads, optimizer))
    # the RoPE tables; ZeRO 1/2: two bf16 reduce buckets as large as the model (it is under 4e7
    # elements); ZeRO-3: a d² bucket and every parameter gathered (all under stage3_max_live_parameters)
    assert plan.buffers - ROPE == [0, 2 * 2 * N, 2 * 2 * N, 2 * 64**2 + 2 * N][zero]


def test_zero3_keeps_whole_blocks_gathered_up_to_the_live_limit():
    big = ModelConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, ffn_hidden=13824)  # 13b
    block = count_params(big).blocks // 40
    plan = memory_plan(big, 4096, "bf16", Layout(dp=64, zero=3))
    assert plan.buffers - 2 * big.max_seq_len * 128 * 4 - 2 * 5120**2 == 2 * 3 * block  # 3 blocks of 318M < 1e9


def test_bf16_pipeline_without_zero_uses_deepspeeds_bf16_optimizer():
    # BF16_Optimizer: a full bf16 gradient accumulator next to the bf16 gradients, their fp32
    # copy at the step, fp32 state ÷ dp
    n = stage_params(SHAPE, tp=1, pp=2)
    plan = memory_plan(SHAPE, 32, "bf16", Layout(dp=2, pp=2, zero=0, micro_batch=2, grad_accum=2))
    assert (plan.params, plan.grads, plan.grads_at_step, plan.optimizer) == (2 * n, 4 * n, 8 * n, 12 * n / 2)


def test_local_engine_keeps_everything_in_fp32():
    plan = memory_plan(SHAPE, 32, "auto", Layout(dp=1, local=True))
    assert (plan.params, plan.gradients, plan.optimizer, plan.buffers) == (4 * N, 4 * N, 8 * N, ROPE)


def test_master_weights_hold_bf16_weights_and_fp32_masters_and_gradients():
    plan = memory_plan(SHAPE, 32, "auto", Layout(dp=1, local=True, master_weights=True))
    assert (plan.params, plan.gradients, plan.optimizer) == (2 * N, 4 * N, 12 * N)
    layout = config_layout(load_config(None, ["train.master_weights=true"]), 1)
    assert layout.master_weights and "(local engine, master weights)" in layout.describe()
    assert not config_layout(load_config(None, ["train.master_weights=true"]), 2).master_weights  # DeepSpeed's plan


@pytest.mark.parametrize("master_weights", [False, True])
def test_async_checkpoint_staging_of_the_local_engine_is_what_a_save_stages(tmp_path, monkeypatch, master_weights):
    import torch

    from bigtrain.checkpoint.writes import Staged
    from bigtrain.config import TrainConfig
    from bigtrain.engine import local
    from bigtrain.model import Llama

    monkeypatch.setattr(local, "resolve_precision", lambda *args: "bf16" if master_weights else "fp32")
    engine = local.local_engine(Llama(SHAPE), TrainConfig(device="cpu", master_weights=master_weights))
    for p in engine.trained:
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()  # the moments exist
    staged = Staged()
    staged.begin()
    engine.save(tmp_path, staged)
    layout = Layout(dp=1, local=True, master_weights=master_weights)
    planned = checkpoint_staging_bytes(SHAPE, layout, memory_plan(SHAPE, 32, "auto", layout))
    steps = 4 * len(list(engine.model.parameters()))  # AdamW's step counter per parameter
    assert planned == 12 * N and staged.bytes() == planned + steps


def test_async_checkpoint_staging_by_layout():
    zero1 = Layout(dp=4, zero=1)
    assert checkpoint_staging_bytes(SHAPE, zero1, memory_plan(SHAPE, 32, "bf16", zero1)) == 2 * N + 12 * N / 4 + 4 * N
    tp2 = Layout(dp=2, tp=2, zero=1)  # no model.safetensors with a tensor split
    plan = memory_plan(SHAPE, 32, "bf16", tp2)
    assert checkpoint_staging_bytes(SHAPE, tp2, plan) == plan.params + plan.optimizer
    ep2 = Layout(dp=2, ep=2, zero=1)  # rank 0 gathers the single-process layout
    assert checkpoint_staging_bytes(MOE, ep2, memory_plan(MOE, 32, "bf16", ep2)) == 12 * MOE_N


def test_offload_moves_the_optimizer_to_cpu():
    on_gpu = memory_plan(SHAPE, 32, "bf16", Layout(dp=4, zero=2))
    offloaded = memory_plan(SHAPE, 32, "bf16", Layout(dp=4, zero=2, offload=True))
    assert offloaded.optimizer == 0 and offloaded.optimizer_cpu == on_gpu.optimizer
    assert on_gpu.total - offloaded.total == pytest.approx(on_gpu.optimizer)


def test_activations_by_hand():
    # per token and layer 2·(4h + 3h + 4·kv + 3f) = 2·(448 + 128 + 768) = 2688 bytes; logits 6·512
    assert activation_bytes(SHAPE, 32, 2, tp=1, layers=4, checkpointing=False) == 2 * 32 * (4 * 2688 + 6 * 512)
    # checkpointing keeps each block's input (2h) and recomputes one block at a time
    assert activation_bytes(SHAPE, 32, 2, tp=1, layers=4, checkpointing=True) == 2 * 32 * (4 * 128 + 2688 + 6 * 512)
    # 1F1B: the first of 2 stages holds 2 micro-batches of its 2 layers
    plan = memory_plan(SHAPE, 32, "bf16", Layout(dp=1, pp=2, micro_batch=2, grad_accum=4))
    assert plan.activations == 2 * activation_bytes(SHAPE, 32, 2, tp=1, layers=2, checkpointing=False)


def test_sequence_parallel_activations_by_hand():
    # sp=2: 16 of the 32 tokens per rank, each with the all-to-all's q, k, v and attention output on
    # the other side too: 2·(2h + 2·kv) = 2·(128 + 64) = 384 more bytes per token and layer
    assert activation_bytes(SHAPE, 32, 2, tp=1, layers=4, sp=2) == 2 * 16 * (4 * (2688 + 384) + 6 * 512)
    # ZeRO partitions over dp × sp: dp=2 × sp=2 splits the optimizer state four ways
    plan = memory_plan(SHAPE, 32, "bf16", Layout(dp=2, sp=2, zero=1, micro_batch=2))
    assert plan.optimizer == 12 * N / 4


def test_long_context_config_fits_only_with_sequence_parallelism():
    """configs/7b-32k.yaml on 8 × 80 GiB: its own layout needs sp (without it, 123 GiB per GPU),
    and --suggest ranks sequence-parallel layouts first."""
    cfg = load_config(CONFIGS / "7b-32k.yaml")
    seq = cfg.data.seq_len
    layout = config_layout(cfg, 8)
    assert layout.sp == 8 and fits(memory_plan(cfg.model, seq, "bf16", layout), 80)
    assert not fits(memory_plan(cfg.model, seq, "bf16", replace(layout, sp=1, dp=8)), 80)
    best, plan, _ = suggest(cfg, gpus=8, gpu_mem_gib=80, peak_flops=989e12)[0]
    assert best.sp > 1 and best.dp * best.sp * best.tp * best.pp == 8


def test_tp_sequence_parallelism_divides_the_d_model_wide_activations_by_tp():
    # tp=2, per token and layer: 2·(4h/2 + (3h + 4·kv + 3f)/2) = 2·(128 + 1088/2) = 1344 bytes, not 2·(256 + 544)
    assert activation_bytes(SHAPE, 32, 2, tp=2, layers=4, tp_sequence_parallel=True) == 2 * 32 * (4 * 1344 + 3 * 512)
    assert activation_bytes(SHAPE, 32, 2, tp=2, layers=4) == 2 * 32 * (4 * 1600 + 3 * 512)
    # full checkpointing keeps each block's input: t/tp tokens of it
    assert activation_bytes(SHAPE, 32, 2, tp=2, layers=4, checkpointing=True, tp_sequence_parallel=True) == (
        2 * 32 * (4 * 64 + 1344 + 3 * 512))
    on, off = (memory_plan(SHAPE, 32, "bf16", Layout(dp=1, tp=2, micro_batch=2, tp_sequence_parallel=sp))
               for sp in (True, False))
    assert off.activations - on.activations == 2 * 32 * 4 * (1600 - 1344)
    cfg = load_config(CONFIGS / "7b.yaml", ["parallel.tp=2"])
    assert config_layout(cfg, 2).tp_sequence_parallel  # on by default with tp > 1
    assert not config_layout(load_config(CONFIGS / "7b.yaml", ["parallel.tp=2", "parallel.tp_sequence_parallel=false"]),
                             2).tp_sequence_parallel
    assert "seq-parallel" in config_layout(cfg, 2).describe()


def test_suggest_ranks_only_layouts_that_fit():
    cfg = load_config(CONFIGS / "7b.yaml")
    ranked = suggest(cfg, gpus=16, gpu_mem_gib=40, peak_flops=989e12)
    times = [t for _, _, t in ranked]
    assert times == sorted(times) and len(ranked) == 10
    for layout, plan, _ in ranked:
        assert fits(plan, 40) and layout.dp * layout.sp * layout.tp * layout.pp == 16
        assert layout.micro_batch * layout.grad_accum * layout.dp == 16  # the config's global batch


def test_info_prints_the_plan_and_flags_what_does_not_fit(capsys):
    assert main(["info", str(CONFIGS / "7b.yaml"), "--gpus", "8", "--gpu-mem", "40"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding 6,607,343,616" in out and "FLOPs/token  4.608e+10" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    # 7B in bf16 on 8 GPUs: 2 bytes/param of weights (÷8 under ZeRO-3), 12 of optimizer (÷8 under ZeRO)
    assert rows["parameters"][:4] == ["12.55", "12.55", "12.55", "1.57"]
    assert rows["optimizer"][:2] == ["75.31", "9.41"]
    # "fits 40 GiB" then ZeRO 0 … 3+offload: 36.8 GiB usable; ZeRO 2 needs 46.95, ZeRO 3 36.44
    assert rows["fits"][2:] == ["NO", "NO", "NO", "yes", "yes"]
    assert "DOES NOT FIT" in out


def test_info_suggest_and_bad_layout(capsys):
    assert main(["info", str(CONFIGS / "1b.yaml"), "--gpus", "8", "--suggest"]) == 0
    assert " 1. dp=" in capsys.readouterr().out
    assert main(["info", str(CONFIGS / "1b.yaml"), "parallel.tp=3", "--gpus", "6"]) == 1
    assert "bigtrain: error: model.n_heads=32 is not divisible by parallel.tp=3" in capsys.readouterr().err
    assert main(["info", str(CONFIGS / "1b.yaml"), "--gpus", "0"]) == 1
    assert "bigtrain: error: --gpus, --gpu-mem and --gpus-per-node must be positive" in capsys.readouterr().err


def test_info_plans_for_the_configs_own_layout_by_default(capsys):
    """Without --gpus: tp × pp × sp × the dp of train.global_batch (7b-32k: sp=8, 16 replicas)."""
    assert main(["info", str(CONFIGS / "7b-32k.yaml")]) == 0
    assert "dp=16 sp=8 tp=1 pp=1 zero=3 micro_batch=1 grad_accum=1 act-ckpt=selective on 128 GPUs" in capsys.readouterr().out


def test_info_environment(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "deepspeed", "accelerate", "mosaicml-streaming", "wandb", "pyarrow", "CUDA", "NCCL"):
        assert name in out
    assert "SLURM_JOB_ID=4242" in out


def test_expert_parallelism_divides_the_experts_a_rank_holds():
    assert count_params(MOE).total == MOE_N == 510_528 and stage_expert_params(MOE, pp=1) == EXPERTS == 393_216
    assert stage_expert_params(MOE, pp=2) == EXPERTS // 2 and stage_expert_params(SHAPE, pp=1) == 0
    # tp splits attention, embedding and head; router and experts stay whole
    assert stage_params(MOE, tp=2, pp=1) == 512 * 32 + 4 * (12_288 // 2 + 128 + 512 + 98_304) + 512 * 32 + 64
    dense = MOE_N - EXPERTS
    zero0 = {ep: memory_plan(MOE, 32, "bf16", Layout(dp=4, ep=ep)) for ep in (1, 2, 4)}
    for ep, plan in zero0.items():  # bf16 weights, their fp32 copy at the step, 12 bytes of AdamW: 1/ep of the experts
        held = dense + EXPERTS / ep
        assert (plan.params, plan.gradients, plan.optimizer) == (2 * held, (2 + 4) * held, 12 * held)
    assert zero0[2].params - 2 * dense == (zero0[1].params - 2 * dense) / 2 == 2 * EXPERTS / 2
    assert zero0[2].optimizer - 12 * dense == (zero0[1].optimizer - 12 * dense) / 2 == 12 * EXPERTS / 2
    # ZeRO 1/2 split the rank's experts over the dp/ep ranks holding the same ones: still 1/dp of every weight
    for zero in (1, 2):
        one, two = (memory_plan(MOE, 32, "bf16", Layout(dp=4, zero=zero, ep=ep)) for ep in (1, 2))
        assert one.optimizer == two.optimizer == 12 * MOE_N / 4 and two.params == 2 * (dense + EXPERTS / 2)
        assert one.params - two.params == 2 * EXPERTS / 2
    one, two = (memory_plan(MOE, 32, "bf16", Layout(dp=4, zero=1, ep=ep)) for ep in (1, 2))
    assert (one.grads, two.grads) == (2 * MOE_N, 2 * (dense + EXPERTS / 2))  # ZeRO-1's full bf16 gradients
    # at the step: the bf16 partition and the fp32 gradients of one group at a time, the experts' (the larger)
    assert (one.grads_at_step, two.grads_at_step) == ((2 + 4) * MOE_N / 4, (2 * MOE_N + 4 * EXPERTS) / 4)


def test_moe_activations_by_hand():
    # an MoE block per token: 2·(4h + 3h + 4·kv) = 1152, top_k = 2 copies of 2·(2h + 3·64) = 640, fp32
    # router probabilities 4·8 = 32 → 2464 bytes (the dense block: 2688)
    assert activation_bytes(MOE, 32, 2, tp=1, layers=4) == 2 * 32 * (4 * 2464 + 6 * 512)
    assert activation_bytes(MOE, 32, 2, tp=1, layers=4, checkpointing=True) == 2 * 32 * (4 * 128 + 2464 + 6 * 512)
    # selective keeps 2·(5h + 2·kv) = 896, 2 copies of 2·(2h + 2·64) = 512 each and the probabilities: 1824
    assert activation_bytes(MOE, 32, 2, tp=1, layers=4, checkpointing="selective") == 2 * 32 * (
        4 * 1824 + 2464 + 6 * 512)
    # tp=2: attention and norms 2·(4h + (3a + 4·kv)/2) = 832, the MoE feed-forward whole: 1312 → 2144;
    # with tensor sequence parallelism everything holds 16 of the 32 tokens: 576 + 1312/2 = 1232
    assert activation_bytes(MOE, 32, 2, tp=2, layers=4) == 2 * 32 * (4 * 2144 + 3 * 512)
    assert activation_bytes(MOE, 32, 2, tp=2, layers=4, tp_sequence_parallel=True) == 2 * 32 * (4 * 1232 + 3 * 512)
    mixed = replace(MOE, moe=replace(MOE.moe, first_dense=2))  # blocks 0 and 1 stay dense
    assert activation_bytes(mixed, 32, 2, tp=1, layers=4) == 2 * 32 * (2 * 2688 + 2 * 2464 + 6 * 512)


def test_layout_reads_and_shows_ep(capsys):
    cfg = load_config(CONFIGS / "moe-tiny.yaml", ["parallel.engine=deepspeed", "parallel.ep=2", "parallel.zero_stage=1"])
    layout = config_layout(cfg, 4)
    assert layout.ep == 2 and layout.describe().startswith("dp=4 ep=2 tp=1 pp=1 zero=1")
    assert "ep=" not in Layout(dp=4).describe()
    assert main(["info", str(CONFIGS / "moe-tiny.yaml"), "--gpus", "4", "parallel.engine=deepspeed", "parallel.ep=2"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("GiB per GPU"))
    assert header.split()[3:] == ["ZeRO", "0", "ZeRO", "1", "ZeRO", "2"]  # no ZeRO-3 with ep > 1


def test_suggest_finds_expert_parallelism_where_the_experts_do_not_fit_otherwise():
    """2 MoE blocks of 32 experts 2048 wide (403M expert weights) on 8 GPUs of 0.8 GiB: every layout
    with whole experts (ZeRO-3 gathers whole blocks) needs at least 0.87 GiB; with ep the rank holds a share."""
    cfg = load_config(CONFIGS / "moe-tiny.yaml", [
        "model.d_model=1024", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=8", "model.moe.experts=32",
        "model.moe.top_k=4", "model.moe.ffn_hidden=2048", "data.micro_batch=1", "train.grad_accum=1"])
    ranked = suggest(cfg, gpus=8, gpu_mem_gib=0.8, peak_flops=989e12)
    assert ranked and all(layout.ep > 1 and fits(plan, 0.8) for layout, plan, _ in ranked)
    for layout, _, _ in ranked:
        assert layout.dp % layout.ep == 0 and 32 % layout.ep == 0 and layout.tp == layout.sp == 1
    whole = [(layout, memory_plan(cfg.model, cfg.data.seq_len, "bf16", replace(layout, ep=1))) for layout, _, _ in ranked]
    assert not any(fits(plan, 0.8) for _, plan in whole)


# docs/planner.md's table of the shipped MoE shapes on 64 GPUs (ZeRO-1, bf16, micro-batch 1 × 4096
# tokens, no activation checkpointing), as `bigtrain info CONFIG --gpus 64 parallel.ep=EP` prints it
SHIPPED_MOE_ROWS = [
    ("olmoe-1b-7b", 1, "| `configs/olmoe-1b-7b.yaml` | 6.92B (1.28B) | dp=64, ep=1 | 12.89 | 12.89 | 1.21 | 0.24 | 10.92 | 38.14 |"),
    ("olmoe-1b-7b", 8, "| `configs/olmoe-1b-7b.yaml` | 6.92B (1.28B) | dp=64, ep=8 | 2.39 | 2.39 | 1.21 | 0.24 | 10.92 | 17.14 |"),
    ("qwen3-30b-a3b", 8, "| `configs/qwen3-30b-a3b.yaml` | 30.53B (3.35B) | dp=64, ep=8 | 9.62 | 9.62 | 5.33 | 0.24 | 30.57 | 55.39 |"),
]


def info_zero1(capsys, name: str, *overrides: str) -> tuple[str, dict[str, str]]:
    """`bigtrain info configs/NAME.yaml --gpus 64`'s output and its ZeRO 1 column, row by row."""
    assert main(["info", str(CONFIGS / f"{name}.yaml"), "--gpus", "64", *overrides]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GiB per GPU"))
    header = lines[start].split()[3:]  # ZeRO 0, ZeRO 1, …
    assert header[2:4] == ["ZeRO", "1"]
    rows = [line.rsplit(maxsplit=len(header) // 2) for line in lines[start + 1:start + 7]]
    return out, {label: values[1] for label, *values in rows}


@pytest.mark.parametrize(("name", "ep", "doc_row"), SHIPPED_MOE_ROWS, ids=["olmoe-ep1", "olmoe-ep8", "qwen3-ep8"])
def test_shipped_moe_figures_in_the_docs_are_the_planners(name, ep, doc_row, capsys):
    """docs/planner.md's figures for OLMoE-1B-7B and Qwen3-30B-A3B, recomputed to the printed precision."""
    doc = (Path(__file__).parents[2] / "docs" / "planner.md").read_text()
    assert doc_row in doc.splitlines()
    out, zero1 = info_zero1(capsys, name, f"parallel.ep={ep}")
    total = re.search(r"^parameters +[\d,]+ \((\S+)\)", out, re.M).group(1)
    active = re.search(r"active parameters [\d,]+ \((\S+)\)", out).group(1)
    layout = re.search(r"^layout +(.*)$", out, re.M).group(1)
    assert layout.startswith(f"dp=64{f' ep={ep}' if ep > 1 else ''} tp=1 pp=1 zero=1 micro_batch=1 grad_accum=8 ")
    assert "precision bf16" in layout and "(config: activation_checkpointing=false)" in out
    cells = [zero1[key] for key in ("parameters", "gradients", "optimizer", "buffers", "activations", "total")]
    assert doc_row == f"| `configs/{name}.yaml` | {total} ({active}) | dp=64, ep={ep} | " + " | ".join(cells) + " |"


def test_qwen3_30b_a3b_figures_in_the_docs_prose_are_the_planners(capsys):
    """'at ep=1 would hold 57 GiB of bf16 weights alone per GPU'; 'with full activation checkpointing
    its activations drop to 4.79 GiB'."""
    doc = " ".join((Path(__file__).parents[2] / "docs" / "planner.md").read_text().split())
    assert "Qwen3-30B-A3B at ep=1 would hold 57 GiB of bf16 weights alone per GPU" in doc
    assert "with full activation checkpointing its activations drop to 4.79 GiB" in doc
    out, zero1 = info_zero1(capsys, "qwen3-30b-a3b", "parallel.ep=1")
    assert round(float(zero1["parameters"])) == 57
    assert re.search(r"^activations .* and 4\.79 GiB with full activation checkpointing", out, re.M)
