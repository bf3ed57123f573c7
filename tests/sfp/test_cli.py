"""`python -m apps.sfp`: the shared commands with SFP / CR-SFP as the method — a tiny train → prune → eval →
export run of both variants, their refusals, and the demo's numbers."""

from __future__ import annotations

import json

import pytest

from apps.sfp.cli import main
from tests.app_cli import RUN, TINY, refused

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["train", *RUN, "--epochs", "3", "--lr", "0.1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("variant", ["sfp", "cr-sfp"])
def test_train_prune_eval_export(base_run, tmp_path, variant):
    out = tmp_path / "prune"
    argv = ["prune", *RUN, "--epochs", "3", "--method", variant, "--flops-target", "0.6"]
    argv += ["--checkpoint", str(base_run / "last.pt"), "--out", str(out), "--formats", "state_dict,onnx"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "sfp" and s["variant"] == variant and s["exact"] and s["max_rel_error"] <= 1e-10
    assert s["macs_after"] <= 0.6 * s["macs_before"] and s["max_rel_error_native"] <= 1e-5
    assert all(e["max_rel_error"] <= 1e-5 for e in s["exports"].values())
    assert "zeroed" in (out / "log.csv").read_text().splitlines()[0]
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
    # extended by one epoch on resume: the zeroing goes on, the export stays exact
    assert main([*argv[:-4], "--epochs", "4", "--out", str(out), "--formats", "state_dict", "--resume"]) == 0
    longer = json.loads((out / "summary.json").read_text())
    assert longer["epochs"] == 4 and longer["exact"] and longer["group_widths"] == s["group_widths"]


def test_bad_input_exits_2_with_the_reason(base_run, tmp_path, capsys):
    ckpt = ["--checkpoint", str(base_run / "last.pt"), "--out", str(tmp_path / "o")]
    err = refused(capsys, main, ["prune", *RUN, "--epochs", "1", "--prune-ratio", "1.5", *ckpt])
    assert "prune_ratio must lie in [0, 1)" in err
    err = refused(capsys, main, ["prune", *RUN, "--epochs", "1", "--criterion", "taylor", *ckpt])
    assert "criterion='taylor' needs a gradient" in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_demo_meets_its_numbers(tmp_path, capsys):
    """The SFP demo: both variants exported exactly with >= 40% fewer MACs and <= 2 points lost."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    for v in ("sfp", "cr-sfp"):
        assert s[f"{v}_max_rel_error"] <= 1e-10 and s[f"{v}_max_rel_error_native"] <= 1e-5
        assert s[f"{v}_macs_reduction"] >= 0.40 and s["base_accuracy"] - s[f"{v}_pruned_accuracy"] <= 2.0
    assert "cr-sfp  narrow" in capsys.readouterr().out
