"""Tensor parallelism reproduces the full model: logits, loss, gradients and AdamW steps (gloo)."""

import copy
import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bigtrain.errors import BigtrainError
from bigtrain.model import Llama, lm_loss
from bigtrain.model.loss import ZLoss, linear_cross_entropy
from bigtrain.parallel.layout import check_tensor_parallel
from bigtrain.parallel.tensor_parallel import apply_tensor_parallel
from bigtrain.parallel.vocab_parallel_loss import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from tests.helpers import small_model_config

SHAPE = {"vocab_size": 96, "ffn_hidden": 64}
GQA = {"n_heads": 4, "n_kv_heads": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world_size: int) -> None:
    # A fork server imports torch, torch._dynamo (AdamW pulls it in) and DeepSpeed once for all
    # workers of the session instead of once per spawned process: seconds each on 2 cores.
    multiprocessing.set_forkserver_preload([__name__, "torch._dynamo", "deepspeed.runtime.utils"])
    args = (world_size, _free_port(), fn)
    mp.start_processes(_init_and_run, args, world_size, start_method="forkserver")


def _init_and_run(rank: int, world_size: int, port: int, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn()
    finally:
        dist.destroy_process_group()


def _tp_group(tp: int) -> dist.ProcessGroup:
    """This rank's group of `tp` consecutive ranks (every rank must create every group)."""
    world = dist.get_world_size()
    groups = [dist.new_group(list(range(start, start + tp))) for start in range(0, world, tp)]
    return groups[dist.get_rank() // tp]


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _assert_same_on_all_ranks(x: torch.Tensor, group: dist.ProcessGroup) -> None:
    for other in _gather(x.unsqueeze(0), 0, group):
        assert torch.equal(other, x)


def _check_parity(cfg_overrides: dict, group: dist.ProcessGroup, sequence_parallel: bool = False) -> None:
    """Forward, backward, gradient norm and three AdamW steps: TP model (with or without sequence
    parallelism) vs the full model."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    cfg = small_model_config(**SHAPE, **cfg_overrides)
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    full = Llama(cfg)
    model = apply_tensor_parallel(copy.deepcopy(full), group, sequence_parallel)
    if cfg.tie_embeddings:
        assert model.layers[-1].lm_head.weight is model.layers[0].embed_tokens.weight
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    full_params = dict(full.named_parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        full_logits = full(inputs)
        full_loss = lm_loss(full_logits, targets)
        logits = model(inputs)
        loss = vocab_parallel_cross_entropy(logits, targets, group)
        if step % 2:  # the head's own loss, chunk by chunk (what the engine runs), on alternate steps
            logits = logits.detach()
            loss = model(inputs, targets)
        residual = model.layers[0](inputs)  # the residual stream: whole, or this rank's tokens under SP
        assert residual.shape[1] == inputs.shape[1] // (tp if sequence_parallel else 1)
        assert logits.shape[-1] == cfg.vocab_size // tp
        torch.testing.assert_close(_gather(logits, -1, group), full_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6 if step == 0 else 1e-5, atol=0)
        full_opt.zero_grad()
        opt.zero_grad()
        full_loss.backward()
        loss.backward()

        # DeepSpeed's rule for the global gradient norm: shards count on every TP rank,
        # replicated parameters on TP rank 0 only; the sum over TP ranks is the full norm.
        sq_norm = torch.zeros(())
        for name, p in model.named_parameters():
            full_grad = full_params[name].grad
            if getattr(p, "tensor_model_parallel", False):
                assert (p.partition_dim, p.partition_stride) in ((0, 1), (1, 1))
                full_grad = full_grad.chunk(tp, dim=p.partition_dim)[rank]
            else:
                assert name.endswith("norm.weight"), f"{name} was left replicated"
                _assert_same_on_all_ranks(p.grad, group)
            torch.testing.assert_close(p.grad, full_grad, rtol=0, atol=1e-5, msg=name)
            if is_model_parallel_parameter(p) or rank == 0:
                sq_norm += p.grad.pow(2).sum()
        dist.all_reduce(sq_norm, group=group)
        full_norm = torch.stack([p.grad.pow(2).sum() for p in full.parameters()]).sum()
        torch.testing.assert_close(sq_norm, full_norm, rtol=1e-5, atol=0)
        full_opt.step()
        opt.step()
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            _assert_same_on_all_ranks(p.detach(), group)


def _check_cross_entropy(group: dist.ProcessGroup) -> None:
    """Each rank's gradient of the vocab-parallel loss is its slice of F.cross_entropy's gradient."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    full_logits = (3 * torch.randn(2, 5, 12, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 12, (2, 5))
    expected = F.cross_entropy(full_logits.reshape(-1, 12), targets.reshape(-1))
    (2.5 * expected).backward()
    shard = full_logits.detach().chunk(tp, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, group)
    (2.5 * loss).backward()
    assert loss.dtype == torch.float32 and shard.grad.dtype == torch.float64
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=0)
    expected_grad = full_logits.grad.chunk(tp, dim=-1)[rank]
    torch.testing.assert_close(shard.grad, expected_grad, rtol=0, atol=1e-6)


def _check_linear_cross_entropy(group: dist.ProcessGroup) -> None:
    """The chunked vocab-parallel head + loss equals `linear_cross_entropy` on the full weight:
    loss, the hidden states' gradient (summed over ranks, as the head's region entry does) and
    this rank's slice of the weight's gradient, for chunks that do and do not divide the tokens."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = (0.5 * torch.randn(24, 16)).requires_grad_()
    targets = torch.randint(0, 24, (3, 10))
    expected = linear_cross_entropy(hidden, weight, targets)
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
    for chunk in (1, 7, None):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().chunk(tp)[rank].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h, w, targets, group, chunk)
        grad_h, grad_w = torch.autograd.grad(2.5 * loss, (h, w))
        dist.all_reduce(grad_h, group=group)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_h, expected_grads[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_w, expected_grads[1].chunk(tp)[rank], rtol=1e-6, atol=1e-7)


def _check_z_loss(group: dist.ProcessGroup) -> None:
    """With a z-loss, both vocab-parallel losses (on logits, and chunk by chunk with the head's
    matmul) give the full-logits cross-entropy, z-loss and gradients of cross-entropy + z-loss:
    the log-sum-exp is the global one."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = (0.5 * torch.randn(24, 16) + 0.1).requires_grad_()
    targets = torch.randint(0, 24, (3, 10))
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.reshape(-1, 24), targets.reshape(-1))
    z = 0.05 * logits.logsumexp(-1).square().mean()
    expected = torch.autograd.grad(2.5 * (ce + z), (hidden, weight))
    for chunk in (None, 1, 7):  # None first: on logits, then chunked
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().chunk(tp)[rank].clone().requires_grad_()
        z_loss = ZLoss(0.05)
        if chunk is None:
            loss = vocab_parallel_cross_entropy(h @ w.t(), targets, group, z_loss)
        else:
            loss = vocab_parallel_linear_cross_entropy(h, w, targets, group, chunk, z_loss)
        grad_h, grad_w = torch.autograd.grad(2.5 * loss, (h, w))
        dist.all_reduce(grad_h, group=group)
        torch.testing.assert_close(loss, ce, rtol=1e-6, atol=0)
        assert z_loss.take()[1].item() == pytest.approx(z.item(), rel=1e-6)
        torch.testing.assert_close(grad_h, expected[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_w, expected[1].chunk(tp)[rank], rtol=1e-5, atol=1e-7)


def _tp2_suite() -> None:
    _count_block_collectives()
    _measure_activation_memory()
    _check_cross_entropy(dist.group.WORLD)
    _check_linear_cross_entropy(dist.group.WORLD)
    _check_z_loss(dist.group.WORLD)
    for sequence_parallel in (False, True):
        _check_parity(GQA, dist.group.WORLD, sequence_parallel)  # one KV head and two query heads per rank
        _check_parity({**GQA, "tie_embeddings": True}, dist.group.WORLD, sequence_parallel)


def _tp4_suite() -> None:
    for sequence_parallel in (False, True):
        _check_parity({"n_heads": 4, "n_kv_heads": 4}, dist.group.WORLD, sequence_parallel)
    # Two TP groups of 2 side by side, as under data parallelism: ranks within a group count.
    tp2 = _tp_group(2)
    _check_cross_entropy(tp2)
    _check_linear_cross_entropy(tp2)
    _check_z_loss(tp2)
    _check_parity({**GQA, "tie_embeddings": True}, tp2, sequence_parallel=True)


def _count_block_collectives() -> None:
    """One block's forward + backward under tp=2: all-reduces of the activations without sequence
    parallelism; with it, all-gathers and reduce-scatters of them (the backward gathers each
    region's input again, as only its shard was kept), and all-reduces only of the two RMSNorm
    weights' gradients."""
    counted: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single", "reduce_scatter_single")}

    def counting(name):
        def wrapper(*args, **kwargs):
            counted.append((name, max(a.numel() for a in args if isinstance(a, torch.Tensor))))
            return originals[name](*args, **kwargs)
        return wrapper

    cfg = small_model_config(**SHAPE, **GQA)
    b, t, d = 2, 8, cfg.d_model
    for sequence_parallel in (False, True):
        torch.manual_seed(0)
        block = apply_tensor_parallel(Llama(cfg), dist.group.WORLD, sequence_parallel).layers[1]
        x = torch.randn(b, t // 2 if sequence_parallel else t, d, requires_grad=True)
        counted.clear()
        for name in originals:
            setattr(dist, name, counting(name))
        try:
            block(x).sum().backward()
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        if sequence_parallel:  # each gather/scatter has the block's full [b, t, d] on one side
            assert sorted(counted) == sorted([("all_gather_single", b * t * d)] * 6
                                             + [("reduce_scatter_single", b * t * d)] * 4
                                             + [("all_reduce", d)] * 2)
        else:
            assert counted == [("all_reduce", b * t * d)] * 4


def saved_activation_bytes(layers, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of `layers` applied to `x`,
    parameters and buffers left out (what activation memory is)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in layers:
            x = layer(x)
    weights = {t.untyped_storage().data_ptr() for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def _measure_activation_memory() -> None:
    """Sequence parallelism keeps the blocks' norms, residuals and region inputs as t/tp tokens."""
    cfg = small_model_config(**SHAPE, **GQA)
    saved = {}
    for sequence_parallel in (False, True):
        torch.manual_seed(0)
        model = apply_tensor_parallel(Llama(cfg), dist.group.WORLD, sequence_parallel)
        tokens = torch.randint(0, cfg.vocab_size, (2, 16))
        saved[sequence_parallel] = saved_activation_bytes(model.layers[1:-1], model.layers[0](tokens))
    print(f"rank {dist.get_rank()}: blocks' saved activations {saved[False]} bytes without sequence "
          f"parallelism, {saved[True]} with it")
    assert saved[True] < 0.8 * saved[False]  # measured 0.76: the d_model-wide tensors are a quarter of it


def _compile_sequence_parallel_block() -> None:
    """A compiled sequence-parallel block: one graph, no graph break, the eager block's output and
    input gradient (compiled, its column linears keep the gathered input rather than the shard)."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    block = apply_tensor_parallel(Llama(small_model_config(**SHAPE, **GQA)), dist.group.WORLD, True).layers[1]
    x = torch.randn(2, 4, 32, requires_grad=True)
    eager = block(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    dynamo.reset()
    dynamo.utils.counters.clear()
    block.compile(dynamic=False)
    for _ in range(2):
        out = block(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_compiled_sequence_parallel_block_has_no_graph_break():
    _spawn(_compile_sequence_parallel_block, 2)


@pytest.mark.distributed
def test_tp2_matches_full_model_with_gqa_and_tied_embeddings():
    _spawn(_tp2_suite, 2)


@pytest.mark.distributed
def test_tp4_and_two_tp2_groups_match_full_model():
    _spawn(_tp4_suite, 4)


@pytest.mark.parametrize(
    ("overrides", "tp", "message"),
    [
        (
            {"n_heads": 6, "n_kv_heads": 6, "d_model": 36},
            4,
            "model.n_heads=6 is not divisible by parallel.tp=4",
        ),
        ({"n_kv_heads": 2}, 4, "model.n_kv_heads=2 is not divisible by parallel.tp=4"),
        ({"vocab_size": 97}, 2, "model.vocab_size=97 is not divisible by parallel.tp=2"),
        ({"ffn_hidden": 66}, 4, "model.ffn_hidden=66 is not divisible by parallel.tp=4"),
        (
            {"ffn_hidden": None, "multiple_of": 3},
            2,
            "model.ffn_hidden=87 (derived from model.d_model) is not divisible by parallel.tp=2",
        ),
    ],
)
def test_check_tensor_parallel_names_the_key(overrides, tp, message):
    cfg = small_model_config(**{**SHAPE, "n_kv_heads": 4, **overrides})
    with pytest.raises(BigtrainError) as err:
        check_tensor_parallel(cfg, tp)
    assert str(err.value) == message


def test_check_tensor_parallel_accepts_divisible_shapes():
    check_tensor_parallel(small_model_config(**SHAPE), 2)
