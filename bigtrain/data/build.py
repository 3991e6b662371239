"""The `data` config section -> the training loader (Arrow or streaming backend, one dataset or a
weighted mixture) and the validation windows (a separate directory or a held-out fraction).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from bigtrain.config import DataConfig
from bigtrain.data.loader import ConcatWindows, Mixture, PackedTokens, WindowLoader, Windows
from bigtrain.data.mds import StreamingWindowLoader, fetch_meta, stream_sources
from bigtrain.data.shards import MANIFEST, load_manifest
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError
from bigtrain.object_store import Retry


class TrainLoader(Protocol):
    """What the train loop uses: one step's micro-batches, a resumable state, the vocabulary."""

    vocab_size: int
    max_token_id: int
    tokenizer_path: Path
    global_batch: int  # windows per optimizer step over all data-parallel ranks

    def next_step(self) -> list[torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _check_config(cfg: DataConfig) -> None:
    if cfg.val_path and cfg.val_fraction:
        raise BigtrainError("set data.val_path or data.val_fraction, not both")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise BigtrainError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    streaming = cfg.backend == "streaming"
    if streaming:
        if cfg.local is None:
            raise BigtrainError("data.backend=streaming needs data.local (the shard cache)")
        if cfg.val_fraction:
            raise BigtrainError(
                "data.val_fraction needs data.backend=arrow; "
                "use data.val_path for validation with data.backend=streaming"
            )
        if cfg.sources and cfg.remote:
            raise BigtrainError("set data.remote or data.sources, not both")
    key, other = ("remote", "path") if streaming else ("path", "remote")
    for i, source in enumerate(cfg.sources):
        if not getattr(source, key):
            raise BigtrainError(f"data.sources[{i}].{key} is not set (data.backend={cfg.backend})")
        if getattr(source, other):
            raise BigtrainError(f"data.sources[{i}].{other} is not used with "
                                f"data.backend={cfg.backend}; give data.sources[{i}].{key}")
        if not source.weight > 0:
            raise BigtrainError(f"data.sources[{i}].weight must be positive, got {source.weight}")


def _retry(cfg: DataConfig) -> Retry:
    return Retry(tries=cfg.download_retry + 1, timeout_s=cfg.download_timeout)


def _streaming_remote(cfg: DataConfig) -> str | None | list[tuple[str, float]]:
    return [(s.remote, s.weight) for s in cfg.sources] or cfg.remote


def check_remote_data(cfg: DataConfig) -> None:
    """Read every streaming source's `bigtrain-mds.json` now, before processes or the model are
    built: a missing bucket, refused credentials or an unreachable endpoint is then one early
    line (after `data.download_retry` retries of `data.download_timeout` seconds at most)."""
    if cfg.backend != "streaming":
        return
    _check_config(cfg)
    for remote, cache in stream_sources(_streaming_remote(cfg), cfg.local):
        fetch_meta(remote, cache, cfg.seq_len, _retry(cfg))


def _check_tokenizer(sha256: str, where: Path | str, expected: tuple[str, str] | None) -> None:
    """Refuse data tokenized with another vocabulary than `expected` = (sha256, its origin)."""
    if expected is not None and sha256 != expected[0]:
        raise BigtrainError(
            f"{where} was tokenized with tokenizer {sha256[:12]}, but {expected[1]} is "
            f"{expected[0][:12]}; prepare the data again with the configured tokenizer"
        )


def _expected_tokenizer(cfg: DataConfig) -> tuple[str, str] | None:
    if cfg.tokenizer is None:
        return None
    return TextTokenizer.load(cfg.tokenizer).sha256, f"data.tokenizer {cfg.tokenizer}"


def _train_sources(cfg: DataConfig) -> list[tuple[PackedTokens, float]]:
    """Every training dataset with its weight, all checked to share one tokenizer."""
    specs = [(s.path, s.weight) for s in cfg.sources] or [(cfg.path, 1.0)]
    expected = _expected_tokenizer(cfg)
    sources = []
    for path, weight in specs:
        data = PackedTokens(path, cfg.seq_len, verify_checksums=cfg.verify_checksums)
        where = Path(path) / MANIFEST
        _check_tokenizer(data.tokenizer_sha256, where, expected)
        expected = expected or (data.tokenizer_sha256, f"the tokenizer of {where}")
        sources.append((data, weight))
    return sources


def _check_vocab(max_token_id: int, where: str, model_vocab_size: int | None) -> None:
    if model_vocab_size is not None and max_token_id >= model_vocab_size:
        raise BigtrainError(
            f"{where} holds token id {max_token_id}; model.vocab_size={model_vocab_size} "
            "is too small for it"
        )


def build_train_loader(
    data_cfg: DataConfig,
    micro_batch: int,
    grad_accum: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    model_vocab_size: int | None = None,
) -> TrainLoader:
    """The loader of this data-parallel rank; with `model_vocab_size`, data whose largest token
    id the model cannot embed is refused.
    """
    _check_config(data_cfg)
    if data_cfg.backend == "streaming":
        loader = StreamingWindowLoader(
            _streaming_remote(data_cfg), data_cfg.local, data_cfg.seq_len, micro_batch, grad_accum,
            dp_rank, dp_size, seed, data_cfg.shuffle, _retry(data_cfg),
        )
        expected = _expected_tokenizer(data_cfg)
        for name, meta in zip(loader.names, loader.metas, strict=True):
            _check_tokenizer(meta["tokenizer"]["sha256"], name, expected)
            expected = expected or (meta["tokenizer"]["sha256"], f"the tokenizer of {name}")
            _check_vocab(int(meta["max_token_id"]), name, model_vocab_size)
        return loader
    sources = _train_sources(data_cfg)
    for data, _ in sources:
        _check_vocab(data.max_token_id, str(data.data_dir), model_vocab_size)
    if data_cfg.val_fraction:
        sources = [(data.split(data_cfg.val_fraction)[0], w) for data, w in sources]
    if len(sources) == 1:
        data: PackedTokens | Mixture = sources[0][0]
    else:
        data = Mixture([d for d, _ in sources], [w for _, w in sources])
    return WindowLoader(data, micro_batch, grad_accum, dp_rank, dp_size, seed, data_cfg.shuffle)


def build_val_data(data_cfg: DataConfig, seq_len: int) -> Windows | None:
    """Validation windows in a fixed order (for `eval.val_batches`), or None when none is configured.

    From `data.val_path`, or the last `data.val_fraction` of every training dataset (whole
    documents, never seen in training).
    """
    _check_config(data_cfg)
    if data_cfg.val_path:
        val = PackedTokens(data_cfg.val_path, seq_len, verify_checksums=data_cfg.verify_checksums)
        expected = _expected_tokenizer(data_cfg)
        if expected is None and data_cfg.backend == "arrow":
            train = Path(data_cfg.sources[0].path if data_cfg.sources else data_cfg.path)
            sha256 = load_manifest(train)["tokenizer"]["sha256"]
            expected = (sha256, f"the tokenizer of {train / MANIFEST}")
        _check_tokenizer(val.tokenizer_sha256, Path(data_cfg.val_path) / MANIFEST, expected)
        return val
    if not data_cfg.val_fraction:
        return None
    sources = _train_sources(replace(data_cfg, seq_len=seq_len))
    parts: list[Windows] = [data.split(data_cfg.val_fraction)[1] for data, _ in sources]
    return parts[0] if len(parts) == 1 else ConcatWindows(parts)
