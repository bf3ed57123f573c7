"""What the apps' command-line tests share: tiny digits runs and the check of a clean refusal."""

from __future__ import annotations

from collections.abc import Callable, Sequence

DATA = ["--dataset", "digits", "--train-limit", "256", "--batch-size", "32"]
TINY = [*DATA, "--arch", "digits_resnet", "--width", "4"]  # eval / export
RUN = [*TINY, "--no-progress"]  # train / prune


def refused(capsys, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> str:
    """The ``error:`` line of a command that must exit with status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err
