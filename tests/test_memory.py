"""Peak memory of a conversion is one output shard plus one tensor's working set, not the
model: a FLUX-shaped source ~27× larger than --max-shard-size converts within that bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qconvert.tiny.synthetic import write_flux_source

PROBE = """
import json, sys
from diffusers import FluxTransformer2DModel  # imports stay out of the measurement
from qconvert.convert import convert

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024

with open('/proc/self/clear_refs', 'w') as f:  # reset the peak (VmHWM) to the current RSS
    f.write('5')
base = status('VmRSS')
result = convert(sys.argv[2], fmt=sys.argv[3], source=sys.argv[1], max_shard_size=int(sys.argv[4]),
                 progress=False)
print(json.dumps({"base": base, "peak": status('VmHWM'), "seconds": result.seconds}))
"""


def test_peak_rss_is_bounded_by_one_shard_plus_one_tensor(tmp_path: Path) -> None:
    src_bytes = write_flux_source(tmp_path / "src", num_layers=3, num_single_layers=6)
    shard = 16 * 10**6
    largest_tensor = 1024 * 5120 * 2  # single block proj_out, bf16
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "mxfp8",
            str(shard),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = stats["peak"] - stats["base"]
    print(f"growth {growth / 2**20:.0f} MiB, source {src_bytes / 2**20:.0f} MiB", stats)
    out_bytes = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.safetensors"))
    assert src_bytes > 25 * shard and out_bytes > 8 * shard
    # One shard being assembled + one source tensor and its fp32 temporaries (~10×) + slack.
    bound = shard + 10 * largest_tensor + 64 * 2**20
    assert growth < bound, f"peak RSS grew {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert growth < src_bytes / 2  # loading the source whole would take all of it
