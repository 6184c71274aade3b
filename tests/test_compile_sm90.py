"""Every kernel launch compiles for sm_90 (Hopper), checked without a GPU.

The other kernel tests run on the CPU under the Triton interpreter, which does not catch what only the
compiler rejects (a name rebound to a tensor of another shape in one branch ran there and failed to
compile on an H200). `tests/_compile_sm90.py` drives the launchers in each code path with the kernels
recorded instead of run and compiles every launch with Triton's own ptxas; it must run without
TRITON_INTERPRET, hence the subprocess. About a minute on a 2-core CPU with Triton's cache cold.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_sm90.py")


def _has_cuda_backend() -> bool:
    spec = importlib.util.find_spec("triton.backends.nvidia")
    return spec is not None and (Path(spec.origin).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_cuda_backend(), reason="this Triton has no CUDA backend / ptxas to compile with")
def test_every_kernel_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    res = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200,
                         check=False)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    assert "launches compile for sm_90" in res.stdout
