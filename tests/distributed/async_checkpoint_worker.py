"""Run under torchrun (2 ranks): each layout of test_async_checkpoint.py trained twice, with
synchronous and with asynchronous checkpoints, into OUT/<layout>-<sync|async>.

argv: CONFIG OUT LAYOUTS_JSON ({name: [override, …]})
"""

import json
import sys
from pathlib import Path

from bigtrain.config import load_config
from bigtrain.train import loop

config_path, out, layouts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
for name, overrides in layouts.items():
    for mode in ("sync", "async"):
        cfg = load_config(config_path, [f"run.dir={out / f'{name}-{mode}'}", f"checkpoint.async={mode == 'async'}",
                                        *overrides])
        loop.train(cfg, console=False)
