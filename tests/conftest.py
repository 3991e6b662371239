import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
TIERS = ("unit", "single_process", "distributed", "s3", "e2e", "slurm")  # run in this order: a broken build fails early


def tier(item: pytest.Item) -> str:
    folder = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
    return folder if folder in TIERS else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its folder's tier (`pytest -m unit` runs the fast tier alone) and run
    the tiers in `TIERS` order (a stable sort: a module's tests stay together)."""
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))
    items.sort(key=lambda item: TIERS.index(tier(item)))


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """A small prepared dataset from ~1.5 MB of the embedded corpus: (train_dir, val_dir)."""
    from bigtrain.data.corpus import write_default_corpus
    from bigtrain.data.prepare import iter_documents, prepare
    from bigtrain.data.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("stdlib_data")
    train_jsonl, val_jsonl = write_default_corpus(root / "corpus", val_fraction=0.1, max_mb=1.5)
    tokenizer = root / "tokenizer.json"
    TextTokenizer.train(iter_documents([train_jsonl]), 512).save(tokenizer)
    prepare([train_jsonl], tokenizer, root / "train")
    prepare([val_jsonl], tokenizer, root / "val")
    return root / "train", root / "val"


@pytest.fixture(scope="session")
def short_documents_data(stdlib_data, tmp_path_factory):
    """The stdlib corpus cut at blank lines into short documents (a few to a few hundred tokens,
    so most windows hold a document boundary), prepared with stdlib_data's tokenizer: (train_dir, val_dir)."""
    import json

    from bigtrain.data.prepare import prepare

    root, source = tmp_path_factory.mktemp("short_documents"), stdlib_data[0].parent
    dirs = []
    for split in ("train", "val"):
        texts = [json.loads(line)["text"] for line in (source / "corpus" / f"{split}.jsonl").read_text().splitlines()]
        pieces = [piece for text in texts for piece in text.split("\n\n") if piece.strip()]
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": piece}) + "\n" for piece in pieces))
        prepare([root / f"{split}.jsonl"], source / "tokenizer.json", root / split)
        dirs.append(root / split)
    return tuple(dirs)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A live S3-protocol server (tools/s3_server.py, moto) for the session: yields its endpoint
    URL with `S3_ENDPOINT_URL` and `AWS_*` credentials set in this process's environment (so
    subprocesses inherit them); stopped by its pid at the end."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "s3_server", Path(__file__).resolve().parents[1] / "tools" / "s3_server.py")
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    sys.modules.setdefault("s3_server", server)
    directory = tmp_path_factory.mktemp("s3_server")
    endpoint = server.start(directory)
    saved = {k: os.environ.get(k) for k in server.env(endpoint)}
    os.environ.update(server.env(endpoint))
    try:
        yield endpoint
    finally:
        server.stop(directory)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the session's S3 server: its name."""
    import uuid

    import boto3

    name = f"bt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
