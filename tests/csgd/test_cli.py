"""`python -m apps.csgd`: the shared commands with C-SGD as the method — a tiny train → prune → eval →
export run, the demo's numbers, and a checkpoint of another method refused."""

from __future__ import annotations

import json

import pytest

from apps.csgd.cli import main
from apps.resrep.cli import main as resrep_main
from tests.app_cli import RUN, TINY, refused

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _fail(capsys, argv, entry=main):
    return refused(capsys, entry, argv)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["train", *RUN, "--epochs", "2", "--lr", "0.1", "--out", str(out)]) == 0
    return out


def test_train_prune_eval_export(base_run, tmp_path, capsys):
    out = tmp_path / "prune"
    # 20 epochs of 32 batches: ~640 iterations, what the momentum iteration needs to collapse the clusters
    argv = ["prune", *RUN, "--batch-size", "8", "--epochs", "20", "--flops-target", "0.6"]
    argv += ["--checkpoint", str(base_run / "last.pt")]
    assert main([*argv, "--out", str(out), "--formats", "state_dict,onnx"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "csgd" and s["macs_after"] <= 0.6 * s["macs_before"] and s["max_rel_error"] <= 1e-10
    assert s["max_rel_error_vs_trained"] <= 1e-5 and s["spread"] <= 1e-5
    assert all(e["max_rel_error"] <= 1e-5 for e in s["exports"].values())
    assert "spread" in (out / "log.csv").read_text().splitlines()[0]
    for ckpt in ("deploy.pt", "last.pt"):
        assert main(["eval", *TINY, "--checkpoint", str(out / ckpt)]) == 0
    assert (
        main(
            [
                "export",
                *TINY,
                "--checkpoint",
                str(out / "last.pt"),
                "--out",
                str(tmp_path / "e"),
                "--formats",
                "state_dict",
            ]
        )
        == 0
    )
    err = _fail(
        capsys, ["export", *TINY, "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "x")], resrep_main
    )
    assert "written by `csgd prune`, not by `resrep prune`" in err
    # extended by 2 epochs on resume: the same clusters and strength, 64 more iterations of fine-tuning
    assert main([*argv, "--epochs", "22", "--out", str(out), "--formats", "state_dict", "--resume"]) == 0
    longer = json.loads((out / "summary.json").read_text())
    assert longer["epochs"] == 22 and longer["centripetal_strength"] == s["centripetal_strength"]
    assert longer["group_widths"] == s["group_widths"] and longer["max_rel_error_vs_trained"] <= 1e-5


def test_an_unconverged_merge_is_refused_with_its_spread(base_run, tmp_path, capsys):
    argv = ["prune", *RUN, "--epochs", "1", "--flops-target", "0.6", "--centripetal-strength", "0.0001"]
    err = _fail(capsys, [*argv, "--checkpoint", str(base_run / "last.pt"), "--out", str(tmp_path / "o")])
    assert "have not converged" in err and "train longer or raise centripetal_strength" in err


def test_demo_meets_its_numbers(tmp_path, capsys):
    """The C-SGD demo: >= 40% fewer MACs, <= 1 point accuracy drop, the merge exact."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["macs_reduction"] >= 0.40 and s["accuracy_drop"] <= 1.0
    assert s["max_rel_error"] <= 1e-10 and s["max_rel_error_vs_trained"] <= 1e-5
    assert "merged accuracy" in capsys.readouterr().out
