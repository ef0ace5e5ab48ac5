"""Print what a `torchrun ... -m cns_lightning trainer=ddp` run left: per stage the ranks, the
all-gathered weight digest and the seconds, and the prior folders (complete, no leftovers).

    python experiments/ddp_loop_summary.py RUN_DIR CACHE_DIR
"""

import json
import sys
from pathlib import Path

run, cache = Path(sys.argv[1]), Path(sys.argv[2])
print(f"run {run}: {json.loads((run / 'summary.json').read_text())['status']}")
for s in sorted((run / "stages").iterdir()):
    info = json.loads((s / "stage.json").read_text())
    print(f"  {s.name}: ranks={info.get('ranks')} weights_sha256={info.get('weights_sha256')} steps={info['steps']} "
          f"seconds={info['seconds']} manifest={(s / 'manifest.json').is_file()}")
for d in sorted((cache / "priors").iterdir()):
    if d.is_dir():
        print(f"  priors/{d.name}: {len(list(d.glob('*.png')))} png, done={(d / 'done.json').is_file()}")
