"""Run under torchrun: several trainings in one launch (the process group is set up once), each
layout of a test into OUT/<name>, one after another.

argv: CONFIG OUT LAYOUTS_JSON ({name: [override, …]})
"""

import json
import sys
from pathlib import Path

from bigtrain.config import load_config
from bigtrain.train import loop

config_path, out, layouts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
for name, overrides in layouts.items():
    loop.train(load_config(config_path, [f"run.dir={out / name}", *overrides]), console=False)
