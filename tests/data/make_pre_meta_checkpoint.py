"""Writes tests/data/pre-meta-checkpoint/: a checkpoint of the local engine as bigtrain wrote it
before ranks built on the meta device (commit bea5c72, global-RNG initialisation), and
`continued.json`, the losses that checkpoint gave when resumed by that same code.

Run from a checkout of that commit: `PYTHONPATH=. python /path/to/make_pre_meta_checkpoint.py OUT`.
"""

import json
import sys
from pathlib import Path

import torch

from bigtrain.checkpoint import io as ckpt
from bigtrain.config import Config, DataConfig, ModelConfig, TrainConfig
from bigtrain.distributed.communicator import LoneProcess
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama

out = Path(sys.argv[1])
cfg = Config(model=ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16),
             data=DataConfig(seq_len=16), train=TrainConfig(device="cpu", lr=1e-2, weight_decay=0.1))
tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))


def engine():
    torch.manual_seed(0)
    return local_engine(Llama(cfg.model), cfg.train)


trained = engine()
for _ in range(3):
    trained.train_step([tokens], 1e-2)
path = ckpt.save_checkpoint(out / "run", 3, trained, LoneProcess(), {"tokens": 3 * 64}, cfg, None)
resumed = engine()
ckpt.load_checkpoint(path, resumed, LoneProcess())
continued = [float(resumed.train_step([tokens], 1e-2).loss) for _ in range(3)]
(out / "continued.json").write_text(json.dumps({"checkpoint": str(path.relative_to(out)), "continued": continued}))
