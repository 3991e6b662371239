"""mosaicml-streaming (MDS) backend: Arrow windows -> MDS shards, and training through
`StreamingDataset` with streaming's own deterministic, elastic resumption.

An MDS sample is one `seq_len + 1` window of the Arrow dataset's token stream, so both backends
hold the same windows. Next to streaming's `index.json` sit `bigtrain-mds.json` (seq_len, window
count, tokenizer hash; written last, so its presence marks a complete conversion) and the
tokenizer. `streaming` is imported where it is used: importing it takes seconds, which every
Arrow-backend run and `prepare` would otherwise pay.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import bigtrain
from bigtrain import compat
from bigtrain.data.loader import PackedTokens
from bigtrain.data.prepare import TOKENIZER_FILE, prepare
from bigtrain.data.remote import DEFAULT_RETRY, first_object, read_bytes
from bigtrain.data.shards import (
    MANIFEST,
    file_sha256,
    load_manifest,
    read_format_json,
    write_atomic,
)
from bigtrain.data.sources import find_inputs
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError, first_line
from bigtrain.object_store import Retry, is_remote, join

MDS_META = "bigtrain-mds.json"
MDS_FORMAT = "bigtrain-mds-v1"
COLUMN = "tokens"


def _require_empty(out: Path) -> None:
    if (out / MDS_META).exists():
        raise BigtrainError(f"{out} already holds an MDS dataset; choose another output")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BigtrainError(f"{out} exists and is not an empty directory; choose another output")


def _require_empty_remote(remote: str, retry: Retry) -> None:
    if not is_remote(remote):
        _require_empty(Path(remote))
        return
    first = first_object(remote, retry)
    if first == MDS_META:
        raise BigtrainError(f"{remote} already holds an MDS dataset; choose another --remote")
    if first is not None:
        raise BigtrainError(f"{remote} is not empty (it holds {first}); choose an empty prefix")


def write_mds(arrow_dir: Path | str, out: Path | str | None, seq_len: int,
              size_limit: int = 1 << 26, remote: str | None = None,
              retry: Retry = DEFAULT_RETRY) -> dict:
    """Write every window of the Arrow dataset at `arrow_dir`, in order, as MDS shards in `out`
    and/or uploaded to `remote` (s3://, gs://, ... or a directory), as streaming's `MDSWriter`
    finishes each shard; `bigtrain-mds.json` is written (uploaded) last.

    Returns the `bigtrain-mds.json` record. `out` and `remote` must be new or empty.
    """
    from streaming import MDSWriter
    from streaming.base.storage.upload import CloudUploader

    if out is None and remote is None:
        raise BigtrainError("to-mds needs an output directory or --remote")
    if out is not None:
        _require_empty(Path(out))
    if remote is not None:
        _require_empty_remote(remote, retry)
    data = PackedTokens(arrow_dir, seq_len, verify_checksums=True)
    dtype = np.dtype(data.manifest["token_dtype"])
    columns = {COLUMN: f"ndarray:{dtype.name}:{seq_len + 1}"}
    console = Console(stderr=True)
    progress = Progress(TextColumn("to-mds"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=not console.is_terminal)
    with tempfile.TemporaryDirectory(prefix="bigtrain-mds-") as scratch:
        local = Path(out) if out is not None else Path(scratch) / "mds"
        target = str(local) if remote is None else (str(local), remote)
        try:
            with progress, MDSWriter(out=target, columns=columns, hashes=["sha256"],
                                     size_limit=size_limit, keep_local=out is not None) as writer:
                task = progress.add_task("to-mds", total=len(data))
                for start in range(0, len(data), 4096):
                    ids = np.arange(start, min(start + 4096, len(data)))
                    for window in data.windows(ids).astype(dtype):
                        writer.write({COLUMN: window})
                    progress.update(task, completed=ids[-1] + 1)
        except Exception as e:  # noqa: BLE001 - streaming's uploads raise each client's types
            raise BigtrainError(f"writing MDS shards to {remote or out} failed: "
                                f"{first_line(e)}") from e
        local.mkdir(parents=True, exist_ok=True)  # without `out`, uploaded shards are deleted
        shutil.copyfile(data.tokenizer_path, local / TOKENIZER_FILE)
        meta = {
            "format": MDS_FORMAT,
            "bigtrain_version": bigtrain.__version__,
            "seq_len": seq_len,
            "windows": len(data),
            "tokens": len(data) * (seq_len + 1),
            "token_dtype": dtype.name,
            "max_token_id": data.max_token_id,
            "tokenizer": data.manifest["tokenizer"],
            "source": {
                "path": str(Path(arrow_dir).resolve()),
                "manifest_sha256": file_sha256(Path(arrow_dir) / MANIFEST),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(local / MDS_META, (json.dumps(meta, indent=2) + "\n").encode())
        if remote is not None:
            uploader = CloudUploader.get((str(local), remote), keep_local=True, exist_ok=True)
            for name in (TOKENIZER_FILE, MDS_META):  # the record last: it marks a complete dataset
                try:
                    uploader.upload_file(name)
                except Exception as e:  # noqa: BLE001 - as above
                    raise BigtrainError(f"uploading {join(remote, name)} failed: "
                                        f"{first_line(e)}") from e
    return meta


def prepare_mds(inputs: list[Path | str], tokenizer_path: Path | str, out: Path | str,
                seq_len: int, remote: str | None = None, **prepare_args) -> tuple[dict, dict]:
    """`prepare --format mds`: the Arrow dataset in `out/arrow` (restartable, checksummed), then
    its windows as MDS in `out/mds` (the directory to name as `data.remote`), uploaded to
    `remote` too when given (checked to be empty before any work).

    Returns the Arrow manifest and the MDS record.
    """
    out = Path(out)
    arrow, mds, staging = out / "arrow", out / "mds", out / ".mds-partial"
    if (mds / MDS_META).exists():
        raise BigtrainError(f"{out} already holds a prepared MDS dataset; choose another --out")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p not in (arrow, mds, staging))
        if not out.is_dir() or foreign or mds.exists():
            raise BigtrainError(
                f"{out} is not empty ({(foreign or ['mds'])[0]}) and holds no unfinished "
                "prepare; choose an empty or new --out"
            )
    if remote is not None:
        _require_empty_remote(remote, DEFAULT_RETRY)
    if (arrow / MANIFEST).exists():
        manifest = load_manifest(arrow)
        same = (
            [s["path"] for s in manifest["sources"]] == [f.path for f in find_inputs(inputs, prepare_args.get("text_field", "text"))]
            and manifest["tokenizer"]["sha256"] == TextTokenizer.load(tokenizer_path).sha256
        )
        if not same:
            raise BigtrainError(
                f"{arrow} was prepared from other inputs or another tokenizer; "
                "re-run with the same arguments, or choose another --out"
            )
    else:
        manifest = prepare(inputs, tokenizer_path, arrow, **prepare_args)
    if staging.exists():
        shutil.rmtree(staging)  # our own conversion, cut short; it is redone from the Arrow data
    meta = write_mds(arrow, staging, seq_len, remote=remote)
    staging.rename(mds)
    return manifest, meta


def load_mds_meta(directory: Path | str) -> dict:
    """Read and check `bigtrain-mds.json` of a converted dataset."""
    path = Path(directory) / MDS_META
    if not path.is_file():
        raise BigtrainError(f"{directory} has no {MDS_META}: not a complete bigtrain MDS dataset")
    meta = read_format_json(path, MDS_FORMAT, "record")
    return meta


def verify_mds(directory: Path | str) -> dict:
    """Check every MDS shard's size and sha256 against `index.json` and the window count."""
    directory = Path(directory)
    meta = load_mds_meta(directory)
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise BigtrainError(f"{directory / 'index.json'} is missing or not valid JSON") from e
    windows = 0
    for shard in index["shards"]:
        raw = shard["raw_data"]
        path = directory / raw["basename"]
        if not path.is_file():
            raise BigtrainError(f"shard {path} is missing")
        if path.stat().st_size != raw["bytes"]:
            raise BigtrainError(
                f"shard {path} is truncated or altered: {path.stat().st_size} bytes, "
                f"index.json says {raw['bytes']}"
            )
        if file_sha256(path) != raw["hashes"]["sha256"]:
            raise BigtrainError(f"shard {path} is corrupt: sha256 does not match index.json")
        windows += shard["samples"]
    if windows != meta["windows"]:
        raise BigtrainError(f"{directory}: shards hold {windows} windows, {MDS_META} says "
                            f"{meta['windows']}")
    return {"shards": len(index["shards"]), "windows": windows, "tokens": meta["tokens"]}


def _fetch(remote: str | None, local: Path, name: str, retry: Retry) -> Path:
    """`local/name`, read afresh from `remote/name` first when a remote is given."""
    target = local / name
    if remote is not None:
        data = read_bytes(join(remote, name), retry)
        local.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
    if not target.is_file():
        raise BigtrainError(f"{target} not found: give data.remote or a prepared data.local")
    return target


def cache_dir(local: Path | str, remote: str) -> Path:
    """A mixture source's own cache under `local`: its remote's last name and a hash of it."""
    name = re.sub(r"[^\w.-]", "_", remote.rstrip("/").rsplit("/", 1)[-1])
    return Path(local) / f"{name}-{hashlib.sha256(remote.encode()).hexdigest()[:8]}"


def stream_sources(remote: str | None | list[tuple[str, float]],
                   local: Path | str) -> list[tuple[str | None, Path]]:
    """(remote, cache directory) of one dataset or of each source of a mixture."""
    if isinstance(remote, list):
        return [(r, cache_dir(local, r)) for r, _ in remote]
    return [(remote, Path(local))]


def fetch_meta(remote: str | None, cache: Path, seq_len: int,
               retry: Retry = DEFAULT_RETRY) -> dict:
    """A dataset's `bigtrain-mds.json`, read afresh from `remote` (bounded by `retry`), checked
    to hold windows of `seq_len`."""
    meta = load_mds_meta(_fetch(remote, cache, MDS_META, retry).parent)
    if meta["seq_len"] != seq_len:
        raise BigtrainError(
            f"{remote or cache} holds windows of seq_len {meta['seq_len']}, "
            f"data.seq_len is {seq_len}; convert again with --seq-len {seq_len}"
        )
    return meta


class StreamingWindowLoader:
    """Micro-batches of MDS windows for one data-parallel rank, read through `StreamingDataset`.

    `remote` is one dataset (None: `local` already holds it) or a weighted mixture
    `[(remote, weight), ...]`: one streaming `Stream` per source, cached in its own sub-directory
    of `local` (`cache_dir`), with proportion weight / sum of weights. As in streaming, an epoch
    is as long as all sources together and gives each source its share of it, repeating the
    windows of a small source and taking another random subset of a large one every epoch.

    Streaming partitions each epoch over `dp_size` "nodes" of one rank each, so its relaxed
    partitioning makes resumption elastic in the DP size; its state (epoch, sample in epoch,
    canonical nodes, seed) is the loader state. Every process of a node must use the same
    `local` cache and iterate together, as streaming coordinates them through shared memory.
    """

    def __init__(self, remote: str | None | list[tuple[str, float]], local: Path | str,
                 seq_len: int, micro_batch: int, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 retry: Retry = DEFAULT_RETRY) -> None:
        from streaming import Stream, StreamingDataset

        if min(micro_batch, grad_accum) < 1:
            raise BigtrainError("micro_batch and grad_accum must be positive")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise BigtrainError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        sources = stream_sources(remote, local)
        self.weights: list[float] | None = None
        if isinstance(remote, list):
            weights = [float(w) for _, w in remote]
            if not all(w > 0 for w in weights):
                raise BigtrainError(f"mixture weights must be positive, got {weights}")
            self.weights = [w / sum(weights) for w in weights]
        self.names = [str(source or cache) for source, cache in sources]
        self.metas = [fetch_meta(source, cache, seq_len, retry) for source, cache in sources]
        self.meta = self.metas[0]
        self.tokenizer_path = _fetch(*sources[0], TOKENIZER_FILE, retry)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.per_rank = micro_batch * grad_accum
        self.global_batch = self.per_rank * dp_size
        proportions = self.weights or [None]
        streams = [Stream(remote=source, local=str(cache), proportion=p)
                   for (source, cache), p in zip(sources, proportions, strict=True)]
        try:
            self.dataset = StreamingDataset(
                streams=streams, batch_size=self.per_rank, shuffle=shuffle, shuffle_seed=seed,
                validate_hash="sha256" if sources[0][0] is not None else None,
                download_retry=retry.tries - 1, download_timeout=retry.timeout_s,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise BigtrainError(f"cannot open MDS dataset {', '.join(self.names)}: "
                                f"{first_line(e)}") from e
        held = self.dataset.samples_per_stream.tolist()
        for (_, cache), name, meta, n in zip(sources, self.names, self.metas, held, strict=True):
            if n != meta["windows"]:
                raise BigtrainError(
                    f"{cache} holds {n} windows, {MDS_META} of {name} says {meta['windows']}: "
                    f"the cache belongs to another dataset; clear {cache}"
                )
        # Partition by DP rank (not by process), so tensor/pipeline peers read the same samples.
        compat.partition_streaming_by(self.dataset, dp_rank, dp_size)
        self.source = ", ".join(self.names)
        self._thread_error: BaseException | None = None
        self._streaming_callback = self.dataset.on_exception
        self.dataset.on_exception = self._keep_thread_error
        self.consumed_windows = 0  # global, over all ranks and epochs
        self._in_epoch = 0  # this rank's samples since the current epoch's iteration began
        self._iter = None

    def _keep_thread_error(self, future) -> None:
        """Streaming's callback for its download threads, keeping the error (a checksum failure,
        a missing shard) for `next_step` to report instead of logging a traceback."""
        self._thread_error = future.exception() or self._thread_error
        try:
            self._streaming_callback(future)  # tells the other threads to stop, then re-raises
        except Exception:  # noqa: BLE001 - reported by _next_window
            pass

    def _next_window(self) -> np.ndarray:
        while True:
            if self._iter is None:
                self._iter, self._in_epoch = iter(self.dataset), 0
            try:
                sample = next(self._iter)
            except StopIteration:
                self._iter = None  # the epoch is over: the next iter() starts the next one
                continue
            except RuntimeError as e:
                cause = self._thread_error or e
                raise BigtrainError(f"reading {self.source} failed: {first_line(cause)} "
                                    "(check it with `bigtrain data verify`)") from cause
            self._in_epoch += 1
            return sample[COLUMN]

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches ([micro_batch, seq_len + 1] int64) for one step."""
        windows = np.stack([self._next_window() for _ in range(self.per_rank)]).astype(np.int64)
        self.consumed_windows += self.global_batch
        return list(torch.from_numpy(windows).split(self.micro_batch))

    def _identity(self) -> dict:
        """What a saved state must match: backend, windows per source, mixture weights."""
        windows = [meta["windows"] for meta in self.metas]
        return {"backend": "streaming", "seq_len": self.meta["seq_len"],
                "windows": windows if self.weights else windows[0], "weights": self.weights}

    def state_dict(self) -> dict:
        # Streaming adds the resumed offset within the epoch (from_beginning=False).
        in_epoch = self._in_epoch * self.dp_size
        return {
            **self._identity(),
            "consumed_windows": self.consumed_windows,
            "dataset": self.dataset.state_dict(num_samples=in_epoch, from_beginning=False),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data, weights and global batch size must match."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise BigtrainError(
                    f"data loader state has {key}={state.get(key)} but this run has {value}; "
                    "resume with the same data and backend"
                )
        dataset = state["dataset"]
        if dataset["shuffle_seed"] != self.seed:
            raise BigtrainError(f"data loader state has seed={dataset['shuffle_seed']} but this "
                                f"run has {self.seed}; resume with the same data seed")
        initial = dataset.get("initial_physical_nodes") or 1
        if self.global_batch % initial:
            raise BigtrainError(
                f"global batch {self.global_batch} windows is not divisible by the "
                f"first run's {initial} data-parallel ranks; keep the global batch size"
            )
        self.dataset.load_state_dict(dataset)
        self.consumed_windows = int(state["consumed_windows"])
        self._iter = None

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def max_token_id(self) -> int:
        return max(int(meta["max_token_id"]) for meta in self.metas)
