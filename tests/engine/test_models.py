"""Models of the ResRep app: CIFAR ResNets (published key names, both shortcuts), digits CNN, torchvision and
user models, and weight loading with clear refusals."""

from __future__ import annotations

import textwrap

import pytest
import torch

from apps.engine.checkpoint import CheckpointError
from apps.engine.data import DataConfig, build_datasets
from apps.engine.loop import evaluate
from apps.engine.models import (
    CifarResNet,
    DigitsResNet,
    ModelConfig,
    ModelError,
    build_model,
    deploy_shell,
    load_weights,
)


@pytest.mark.parametrize("depth,params", [(20, 269_722), (56, 853_018)])
def test_cifar_resnet_option_a_matches_published_layout(depth, params):
    m = CifarResNet(depth)
    assert sum(p.numel() for p in m.parameters()) == params  # the published 0.27M / 0.85M
    n = (depth - 2) // 6
    names = set(m.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_var",
        "linear.weight",
        "linear.bias",
        f"layer3.{n - 1}.conv2.weight",
        "layer2.0.bn1.weight",
    } <= names
    assert not any("shortcut" in k for k in names)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_zero_pads_subsampled_input():
    block = CifarResNet(20).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_option_b_has_projection_shortcuts():
    m = build_model(ModelConfig(arch="resnet32", shortcut="B"), num_classes=100)
    names = set(m.state_dict())
    assert {"layer2.0.shortcut.0.weight", "layer3.0.shortcut.1.running_mean"} <= names
    assert "layer1.0.shortcut.0.weight" not in names
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_bad_depth_and_shortcut():
    with pytest.raises(ModelError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ModelError, match="shortcut"):
        build_model(ModelConfig(arch="resnet20", shortcut="C"), num_classes=10)


def test_digits_resnet_has_residual_blocks():
    m = DigitsResNet(width=8)
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert isinstance(m.layer1[0].shortcut, torch.nn.Identity) and len(m.layer2[0].shortcut) == 2


def test_torchvision_by_name():
    m = build_model(ModelConfig(arch="tv:resnet18"), num_classes=7)
    assert m.fc.out_features == 7
    with pytest.raises(ModelError, match="no model"):
        build_model(ModelConfig(arch="tv:not_a_net"), num_classes=7)


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent("""
        import torch
        def tiny(num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
        not_a_model = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model(ModelConfig(arch="mynets:tiny"), num_classes=4)(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ModelError, match="no attribute"):
        build_model(ModelConfig(arch="mynets:missing"), num_classes=4)
    with pytest.raises(ModelError, match="cannot import"):
        build_model(ModelConfig(arch="no_such_pkg.mod:fn"), num_classes=4)
    with pytest.raises(ModelError, match="unknown arch"):
        build_model(ModelConfig(arch="vgg"), num_classes=4)


def test_load_published_style_checkpoint(tmp_path):
    """{'state_dict': {'module.' + key: tensor}, 'best_prec1': float}, as the published files."""
    src = CifarResNet(20).eval()
    torch.save(
        {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "best_prec1": 91.7}, tmp_path / "r20.th"
    )
    dst = load_weights(CifarResNet(20).eval(), tmp_path / "r20.th")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save({"state_dict": CifarResNet(20).state_dict()}, tmp_path / "r20.th")
    with pytest.raises(ModelError, match="missing layer1.3.*check --arch"):
        load_weights(CifarResNet(32), tmp_path / "r20.th")
    with pytest.raises(ModelError, match="unexpected layer2.0.shortcut"):
        torch.save(CifarResNet(20, shortcut="B").state_dict(), tmp_path / "b.pt")
        load_weights(CifarResNet(20), tmp_path / "b.pt")
    with pytest.raises(ModelError, match="shape mismatch linear.weight"):
        torch.save(CifarResNet(20, num_classes=100).state_dict(), tmp_path / "c100.pt")
        load_weights(CifarResNet(20), tmp_path / "c100.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.th").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(CifarResNet(20), tmp_path / "bad.th")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(CifarResNet(20), tmp_path / "absent.th")


def test_deploy_shell_rebuilds_narrow_bn_free_network():
    """A hand-narrowed state_dict (BNs dropped, convs biased and thinner) loads into the shell."""
    m = DigitsResNet(width=8)
    sd = {
        k: v for k, v in m.state_dict().items() if ".bn" not in k and not k.startswith("bn1") and "shortcut.1" not in k
    }
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:5]
    sd["layer1.0.conv1.bias"] = torch.zeros(5)
    sd["layer1.0.conv2.weight"] = sd["layer1.0.conv2.weight"][:, :5]
    shell = deploy_shell(DigitsResNet(width=8), sd)
    assert isinstance(shell.bn1, torch.nn.Identity) and isinstance(shell.layer2[0].shortcut[1], torch.nn.Identity)
    assert shell.layer1[0].conv1.out_channels == 5 and shell.layer1[0].conv2.in_channels == 5
    assert shell(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_published_checkpoints_load(shared_data, depth):
    path = next((shared_data / "cifar-resnet").glob(f"resnet{depth}-*.th"))
    load_weights(CifarResNet(depth), path)


def test_published_resnet20_accuracy_on_jpeg_test_images(shared_data):
    """The README measures 81.0% on the whole JPEG test set; 300 images must land near it."""
    model = load_weights(CifarResNet(20), next((shared_data / "cifar-resnet").glob("resnet20-*.th")))
    _, test, _ = build_datasets(
        DataConfig(
            dataset="jpeg-npz",
            test_limit=300,
            train_limit=1,
            root=str(shared_data / "cifar10-jpeg" / "cifar10_jpegbytes.npz"),
        )
    )
    acc = evaluate(model, torch.utils.data.DataLoader(test, batch_size=100), device=torch.device("cpu"))["acc"]
    assert 72.0 <= acc <= 90.0


def test_deploy_shell_with_the_plan_rebuilds_option_a_exactly():
    """Residual-mode pruning of an option-A ResNet narrows the shortcut pads inside `forward`; the
    plan stored beside the weights redoes that surgery, shapes alone cannot."""
    from apps.resrep import ResRep, ResRepConfig

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rr = ResRep(
        CifarResNet(20, shortcut="A").double(),
        x,
        ResRepConfig(recipe="paper", flops_target=0.5, begin_granularity=10**6),
    )
    with torch.no_grad():
        for _, compactor in rr.compactors():
            compactor.weight.mul_(torch.rand(compactor.weight.shape[0], 1, 1, 1, dtype=torch.float64) + 0.5)
    rr.update_masks()
    with pytest.warns(RuntimeWarning, match="had not decayed"):
        deploy, _ = rr.convert()
    sd = {k: v.clone() for k, v in deploy.state_dict().items()}
    shell = deploy_shell(CifarResNet(20, shortcut="A").double(), sd, plan=deploy.meta["reparam.plan"].to_json())
    assert torch.equal(shell(x), deploy(x))
    with pytest.raises(RuntimeError):  # without the plan the pads keep their original amounts
        deploy_shell(CifarResNet(20, shortcut="A").double(), sd)(x)
