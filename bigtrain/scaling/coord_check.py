"""µP's coordinate check (Tensor Programs V, Section 4 and Figure 5 of Yang et al. 2021): train the
same model at several widths for a few steps, under standard parametrization and under µP, and
measure the RMS of the logits and of every block's output at each step. Under µP these stay about
the same as width grows; under standard parametrization with Adam they grow with width."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bigtrain.config import Config
from bigtrain.data.build import build_train_loader
from bigtrain.engine.device import pick_device
from bigtrain.engine.optimizer import build_adamw, scheduled_lr
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.llama import Block
from bigtrain.model.mup import widened

PARAMETRIZATIONS = ("standard", "mup")
# {parametrization: {width: [{"logits": rms, "block.1": rms, ...} at steps 0..T]}}
Measurements = dict[str, dict[int, list[dict[str, float]]]]


def _rms(x: torch.Tensor) -> float:
    return x.detach().float().square().mean().sqrt().item()


def measure(cfg: Config, width: int, parametrization: str, steps: int) -> list[dict[str, float]]:
    """RMS of the logits and of each block's output for steps 0..`steps`: the forward pass of step
    t comes after t Adam updates at the constant `train.lr` (no warmup, no clipping), on the same
    batches (seeded by `run.seed`) whatever the width."""
    try:
        model_cfg = widened(cfg.model, width, parametrization)
    except ValueError as e:
        raise BigtrainError(f"coord-check: {e}") from None
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.run.seed)
    model = Llama(model_cfg, seed=cfg.run.seed, device=device)
    optimizer = build_adamw(model, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = scheduled_lr(group, cfg.train.lr)
    loader = build_train_loader(cfg.data, cfg.data.micro_batch, 1, 0, 1, cfg.run.seed, model_cfg.vocab_size)
    seen: dict[str, float] = {}
    blocks = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, Block)]
    for i, block in blocks:
        block.register_forward_hook(lambda _m, _in, out, key=f"block.{i}": seen.__setitem__(key, _rms(out)))
    records = []
    for step in range(steps + 1):
        batch = loader.next_step()[0].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        records.append({"logits": _rms(logits), **seen})
        if step == steps:
            break
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return records


def coord_check(cfg: Config, widths: list[int], steps: int,
                parametrizations: tuple[str, ...] = PARAMETRIZATIONS) -> Measurements:
    """`measure` every width under each parametrization."""
    if steps < 1 or not widths or min(widths) < 1:
        raise BigtrainError("coord-check needs --steps >= 1 and positive --widths")
    return {p: {w: measure(cfg, w, p, steps) for w in widths} for p in parametrizations}


def last_step(results: Measurements) -> dict[str, dict[int, dict[str, float]]]:
    """parametrization → width → the RMS values at the last step."""
    return {p: {w: records[-1] for w, records in by_width.items()} for p, by_width in results.items()}


def coord_plot(results: Measurements, base_width: int, path: Path) -> Path:
    """As Figure 5 of Tensor Programs V: RMS vs width (log-log), one line per step; a row per
    parametrization, a column for the logits and each block's output."""
    from bigtrain.scaling.plots import coord_check_figure

    return coord_check_figure(results, base_width, path)


def report(results: Measurements) -> str:
    """A table of the last step's RMS per parametrization and width, and the logits' growth."""
    lines = []
    for p, by_width in last_step(results).items():
        keys = list(next(iter(by_width.values())))
        lines.append(f"{p}: RMS at the last step")
        lines.append("  " + "  ".join(f"{k:>9}" for k in ["width", *keys]))
        for w, values in by_width.items():
            lines.append("  " + "  ".join([f"{w:>9}", *(f"{values[k]:>9.4g}" for k in keys)]))
        widths = sorted(by_width)
        lines.append(f"  logits RMS, widest / narrowest: {by_width[widths[-1]]['logits'] / by_width[widths[0]]['logits']:.2f}")
    return "\n".join(lines)


