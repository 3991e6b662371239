"""MDS datasets on a live S3-protocol server: `to-mds --remote` uploads, training from `s3://`
equals training from a directory bit for bit (one source, a mixture, resumed mid-epoch), and an
unreadable remote is one line and a non-zero exit, within a bounded time."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from bigtrain.cli import main
from bigtrain.config import SourceConfig
from bigtrain.data.mds import MDS_META, write_mds
from bigtrain.train.loop import train
from tests.helpers import tiny_config

SEQ_LEN = 64
SHARD_BYTES = 1 << 16  # a dozen shards for the 1.5 MB test corpus
REPO = Path(__file__).resolve().parents[2]


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _directory(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _without_date(record: bytes) -> dict:
    return {k: v for k, v in json.loads(record).items() if k != "created"}


def test_to_mds_uploads_the_shards_and_the_record_last(stdlib_data, s3_server, s3_bucket, tmp_path,
                                                       monkeypatch):
    from streaming.base.storage.upload import S3Uploader

    uploaded, upload = [], S3Uploader.upload_file
    monkeypatch.setattr(S3Uploader, "upload_file", lambda self, name: (uploaded.append(name), upload(self, name)))
    remote = f"s3://{s3_bucket}/web/mds"
    write_mds(stdlib_data[0], None, SEQ_LEN, size_limit=SHARD_BYTES, remote=remote)
    write_mds(stdlib_data[0], tmp_path / "local", SEQ_LEN, size_limit=SHARD_BYTES)
    client = boto3.client("s3", endpoint_url=s3_server)
    held, local = _objects(client, s3_bucket, "web/mds/"), _directory(tmp_path / "local")
    shards = [s["raw_data"]["basename"] for s in json.loads(local["index.json"])["shards"]]
    assert len(shards) >= 10 and sorted(held) == sorted(local) == sorted([*shards, "index.json", "tokenizer.json", MDS_META])
    assert all(held[name] == local[name] for name in local if name != MDS_META)  # byte for byte
    assert _without_date(held[MDS_META]) == _without_date(local[MDS_META])
    assert sorted(uploaded[:-3]) == sorted(shards) and uploaded[-3:] == ["index.json", "tokenizer.json", MDS_META]


def _cli(*args: str, capsys) -> tuple[int, list[str], str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


def test_to_mds_cli_keeps_a_local_copy_and_refuses_a_used_remote(stdlib_data, s3_server, s3_bucket,
                                                                 tmp_path, capsys):
    client = boto3.client("s3", endpoint_url=s3_server)
    remote = f"s3://{s3_bucket}/mds"
    code, err, out = _cli("data", "to-mds", str(stdlib_data[0]), str(tmp_path / "mds"), "--remote", remote,
                          "--seq-len", str(SEQ_LEN), capsys=capsys)
    assert code == 0 and err == [] and out.strip().endswith(f"→ {tmp_path / 'mds'} and {remote}")
    held = _objects(client, s3_bucket, "mds/")
    assert held == _directory(tmp_path / "mds") and MDS_META in held

    code, err, _ = _cli("data", "to-mds", str(stdlib_data[0]), "--remote", remote + "/", "--seq-len", "32",
                        capsys=capsys)
    assert code == 1 and err == [f"bigtrain: error: {remote}/ already holds an MDS dataset; choose another --remote"]
    assert _objects(client, s3_bucket, "mds/") == held  # untouched
    client.put_object(Bucket=s3_bucket, Key="notes/readme.txt", Body=b"mine")
    code, err, _ = _cli("data", "to-mds", str(stdlib_data[0]), "--remote", f"s3://{s3_bucket}/notes",
                        "--seq-len", "32", capsys=capsys)
    assert code == 1 and err == [f"bigtrain: error: s3://{s3_bucket}/notes is not empty (it holds readme.txt); "
                                 "choose an empty prefix"]
    assert _objects(client, s3_bucket, "notes/") == {"readme.txt": b"mine"}
    code, err, _ = _cli("data", "to-mds", str(stdlib_data[0]), "--remote", "s3://bt-no-such-bucket/mds",
                        "--seq-len", "32", capsys=capsys)
    assert code == 1 and len(err) == 1 and re.fullmatch(
        r"bigtrain: error: cannot list s3://bt-no-such-bucket/mds: NoSuchBucket: The specified bucket does "
        r"not exist \(gave up after 1 try over \d+\.\d s\)", err[0]), err


def test_to_mds_to_a_directory_remote_and_its_usage_errors(stdlib_data, tmp_path, capsys):
    code, err, _ = _cli("data", "to-mds", str(stdlib_data[0]), "--remote", str(tmp_path / "shared"),
                        "--seq-len", str(SEQ_LEN), capsys=capsys)
    assert code == 0 and err == [] and sorted(_directory(tmp_path / "shared"))[:2] == [MDS_META, "index.json"]
    code, err, _ = _cli("data", "to-mds", str(stdlib_data[0]), "--seq-len", "32", capsys=capsys)
    assert code == 1 and err == ["bigtrain: error: to-mds needs an output directory or --remote"]


def test_prepare_format_mds_checks_the_remote_first_and_uploads(stdlib_data, s3_server, s3_bucket, tmp_path,
                                                                 capsys):
    client = boto3.client("s3", endpoint_url=s3_server)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                               for i in range(400)))
    client.put_object(Bucket=s3_bucket, Key="used/index.json", Body=b"{}")
    args = ["prepare", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(stdlib_data[0] / "tokenizer.json"),
            "--format", "mds", "--seq-len", "16", "--workers", "1", "--out", str(tmp_path / "out")]
    code, err, _ = _cli(*args, "--remote", f"s3://{s3_bucket}/used", capsys=capsys)
    assert code == 1 and err == [f"bigtrain: error: s3://{s3_bucket}/used is not empty (it holds index.json); "
                                 "choose an empty prefix"]
    assert not (tmp_path / "out").exists()  # refused before tokenizing anything
    code, err, out = _cli(*args, "--remote", f"s3://{s3_bucket}/code", capsys=capsys)
    assert code == 0 and out.strip().endswith(f"→ {tmp_path / 'out' / 'mds'} and s3://{s3_bucket}/code")
    assert _objects(client, s3_bucket, "code/") == _directory(tmp_path / "out" / "mds")


def _streaming_config(data, run_dir: Path, cache: Path, steps: int, every: int, remote=None, sources=()):
    cfg = tiny_config(data, run_dir, steps=steps, val_every=1000)
    cfg.data.backend, cfg.data.local, cfg.data.remote = "streaming", str(cache), remote
    cfg.data.sources = [SourceConfig(remote=r, weight=w) for r, w in sources]
    cfg.checkpoint.every = every
    return cfg


def test_training_from_s3_equals_training_from_a_directory(stdlib_data, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/web"
    write_mds(stdlib_data[0], tmp_path / "web", SEQ_LEN, size_limit=SHARD_BYTES)
    write_mds(stdlib_data[0], None, SEQ_LEN, size_limit=SHARD_BYTES, remote=remote)

    def run(name, source, resume=None):
        cfg = _streaming_config(stdlib_data, tmp_path / name, tmp_path / f"cache-{name}", 8, 4, remote=source)
        cfg.run.resume = resume
        return train(cfg, console=False)

    directory, s3 = run("directory", str(tmp_path / "web")), run("s3", remote)
    assert len(s3.losses) == 8 and s3.losses == directory.losses  # bitwise: the same floats
    assert any((tmp_path / "cache-s3").glob("shard.*.mds"))  # streamed from the bucket
    state = json.loads((tmp_path / "s3/checkpoints/step-0000004/state.json").read_text())["loader"]
    assert state["consumed_windows"] == 32 < state["windows"]  # the checkpoint is mid-epoch
    resumed = run("resumed", remote, resume=str(tmp_path / "s3/checkpoints/step-0000004"))
    assert resumed.losses == s3.losses[4:]


def test_a_mixture_of_two_buckets_equals_the_same_mixture_of_directories(stdlib_data, s3_server,
                                                                           s3_bucket, tmp_path):
    other = f"bt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=other)
    remotes = [f"s3://{s3_bucket}/web", f"s3://{other}/code/mds"]
    for k, prepared in enumerate(stdlib_data):  # two datasets sharing the tokenizer
        write_mds(prepared, tmp_path / f"dir{k}", SEQ_LEN, size_limit=SHARD_BYTES)
        write_mds(prepared, None, SEQ_LEN, size_limit=SHARD_BYTES, remote=remotes[k])

    def run(name, sources, resume=None):
        cfg = _streaming_config(stdlib_data, tmp_path / name, tmp_path / f"cache-{name}", 4, 2, sources=sources)
        cfg.run.resume = resume
        return train(cfg, console=False)

    directories = run("directories", [(str(tmp_path / "dir0"), 3.0), (str(tmp_path / "dir1"), 1.0)])
    s3 = run("s3", [(remotes[0], 3.0), (remotes[1], 1.0)])
    assert len(s3.losses) == 4 and s3.losses == directories.losses
    state = json.loads((tmp_path / "s3/checkpoints/step-0000002/state.json").read_text())["loader"]
    assert state["weights"] == [0.75, 0.25] and state["consumed_windows"] == 16 < sum(state["windows"])
    resumed = run("resumed", [(remotes[0], 3.0), (remotes[1], 1.0)], str(tmp_path / "s3/checkpoints/step-0000002"))
    assert resumed.losses == s3.losses[2:]


def _train_cli(tmp_path: Path, remote: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """`bigtrain train` of a streaming run from `remote`, retrying once with 2 s per try."""
    cmd = [sys.executable, "-m", "bigtrain", "train", str(REPO / "configs/debug.yaml"), f"run.dir={tmp_path / 'run'}",
           "data.backend=streaming", f"data.remote={remote}", f"data.local={tmp_path / 'cache'}",
           "data.download_retry=1", "data.download_timeout=2"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    return proc, time.monotonic() - started


def _one_line(proc: subprocess.CompletedProcess, object_url: str, reason: str, tries: int) -> float:
    """The seconds the one error line says were spent, after checking its form."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    head = f"bigtrain: error: cannot read {object_url}: {reason}"
    assert lines[0].startswith(head), lines[0]
    tail = lines[0][len(head):]
    assert tail.endswith(" s)") and f"(gave up after {tries} {'try' if tries == 1 else 'tries'} over " in tail
    return float(tail.rsplit(" over ", 1)[1][:-3])


def test_a_missing_bucket_is_one_line(s3_server, tmp_path):
    proc, _ = _train_cli(tmp_path, "s3://bt-missing-bucket/web", dict(os.environ))
    _one_line(proc, f"s3://bt-missing-bucket/web/{MDS_META}", "NoSuchBucket: The specified bucket does not exist", 1)
    assert not (tmp_path / "run").exists()  # refused before the run directory or the model


def test_wrong_credentials_are_one_line(s3_server, tmp_path):
    server = sys.modules["s3_server"]
    endpoint = server.start(tmp_path / "auth", authenticate=True)
    try:
        proc, _ = _train_cli(tmp_path, "s3://corpus/web", {**os.environ, "S3_ENDPOINT_URL": endpoint})
    finally:
        server.stop(tmp_path / "auth")
    _one_line(proc, f"s3://corpus/web/{MDS_META}", "InvalidAccessKeyId: The AWS Access Key Id you provided "
              "does not exist in our records.", 1)


@pytest.mark.parametrize("endpoint", ["closed", "silent"])
def test_an_unreachable_endpoint_is_one_line_after_bounded_tries(s3_server, tmp_path, endpoint):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if endpoint == "silent":
            sock.listen(8)  # connections complete in the backlog; nothing ever answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        proc, wall = _train_cli(tmp_path, "s3://corpus/web", {**os.environ, "S3_ENDPOINT_URL": url})
    reason = "Could not connect to the endpoint URL" if endpoint == "closed" else "Read timeout on endpoint URL"
    spent = _one_line(proc, f"s3://corpus/web/{MDS_META}", f'{reason}: "{url}/corpus/web/{MDS_META}"', 2)
    # two tries with a 1 s pause between them; at a silent endpoint each try waits out its 2 s
    # timeout (the 60 s limit of `_train_cli` is what says it never hangs)
    assert spent >= (1.0 if endpoint == "closed" else 5.0) and spent < wall
