"""The pure algebra imports and computes on numpy arrays in a process where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")
            return None


    sys.meta_path.insert(0, NoTorch())

    import numpy as np

    import reparam
    from reparam import ops

    rng = np.random.default_rng(0)
    k3, k1 = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 1, 1))
    stats = ops.NormStats(rng.standard_normal(4), rng.random(4) + 0.1, rng.standard_normal(4), rng.standard_normal(4), 1e-5)
    g3 = ops.ConvGeometry.create(3, padding=1, groups=2)
    g1 = ops.ConvGeometry.create(1, padding=0, groups=2)
    main = ops.fuse_bn(k3, None, stats)
    side = ops.fuse_bn(ops.embed_kernel(k1, g1, g3), None, stats)
    ident = ops.fuse_bn(ops.identity_kernel(4, 2, g3, like=k3), None, stats)
    kernel, bias = ops.add_branches(main, side, ident)
    kernel, bias, geometry = ops.compose(kernel, bias, g3, k1, None, g1)
    assert isinstance(kernel, np.ndarray) and kernel.shape == (4, 2, 3, 3) and kernel.dtype == np.float64
    assert geometry == g3
    assert "torch" not in sys.modules and "torchvision" not in sys.modules
    for name in ("merge", "graph"):
        try:
            getattr(reparam, name)
        except ImportError as err:
            assert "needs torch" in str(err), err
        else:
            raise AssertionError(f"reparam.{name} resolved without torch")
    try:
        ops.RepVGGBlock
    except ImportError as err:
        assert "needs torch" in str(err), err
    else:
        raise AssertionError("ops.RepVGGBlock resolved without torch")
    assert "RepVGGBlock" not in ops.__all__ and "fuse_bn" in ops.__all__
    print("ok")
    """
)


def test_the_algebra_runs_on_numpy_with_torch_absent():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
