import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")


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
