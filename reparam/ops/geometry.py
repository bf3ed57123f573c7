"""The geometry of a convolution, separated from its weights (pure Python: no array library).

A `ConvGeometry` says which input positions each kernel tap reads: output position ``i`` (per
spatial dim) reads input ``s·i − P_before + d·u`` for tap ``u``; reads outside the input see the
padding (zeros, or the reflect/replicate/circular remap of the input). Paddings are per side so
that asymmetric pads (and negative ones, i.e. crops) are first-class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConvGeometry"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

PaddingSpec = int | str | Sequence[int] | Sequence[Sequence[int]]


def _tuple(v: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    t = (int(v),) * ndim if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != ndim:
        raise ValueError(f"{what} {v!r} has {len(t)} entries, expected {ndim}")
    return t


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a (transposed) convolution except its weights.

    `padding` holds ``(before, after)`` per spatial dim; negative entries crop. For a transposed
    convolution `padding` is the (symmetric) amount cropped from the output, as in
    ``nn.ConvTranspose``, and `output_padding` the extra size added on the after side.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.kernel_size)
        if not 1 <= n <= 3:
            raise ValueError(f"ConvGeometry supports 1 to 3 spatial dims, got kernel_size {self.kernel_size}")
        if len(self.stride) != n or len(self.dilation) != n or len(self.padding) != n:
            raise ValueError(f"inconsistent ranks in {self}")
        if any(len(p) != 2 for p in self.padding):
            raise ValueError(f"padding must be (before, after) pairs, got {self.padding}")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or self.groups < 1:
            raise ValueError(f"kernel_size, stride, dilation and groups must be positive in {self}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: PaddingSpec | None = None,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        ndim: int | None = None,
    ) -> ConvGeometry:
        """Build from ``nn.Conv``-style arguments; `padding` may be an int, one int per dim, one
        ``(before, after)`` pair per dim, ``'same'``, ``'valid'``, or None (centred: ``d(k−1)/2``,
        the extra tap after when ``d(k−1)`` is odd, like ``'same'``)."""
        if ndim is None:
            ndim = 2 if isinstance(kernel_size, int) else len(kernel_size)
        k = _tuple(kernel_size, ndim, "kernel_size")
        d = _tuple(dilation, ndim, "dilation")
        if padding is None or padding == "same":
            pads = tuple((di * (ki - 1) // 2, di * (ki - 1) - di * (ki - 1) // 2) for ki, di in zip(k, d))
        elif padding == "valid":
            pads = ((0, 0),) * ndim
        elif isinstance(padding, int):
            pads = ((padding, padding),) * ndim
        else:
            items = list(padding)  # type: ignore[arg-type]
            if len(items) != ndim:
                raise ValueError(f"padding {padding!r} has {len(items)} entries, expected {ndim}")
            pads = tuple((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in items)
        return cls(k, _tuple(stride, ndim, "stride"), d, pads, int(groups), padding_mode)

    def replace(self, **changes) -> ConvGeometry:
        """A copy with some fields changed."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        fields.update(changes)
        return ConvGeometry(**fields)

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        """Number of spatial dims."""
        return len(self.kernel_size)

    @property
    def is_symmetric(self) -> bool:
        """True when every spatial dim pads the same amount on both sides."""
        return all(b == a for b, a in self.padding)

    @property
    def pads(self) -> bool:
        """True when any input position outside the input is read (any positive padding)."""
        return any(b > 0 or a > 0 for b, a in self.padding)

    @property
    def extent(self) -> tuple[int, ...]:
        """Receptive field of one output position: ``d(k−1)+1`` per dim."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    def f_pad(self) -> tuple[int, ...]:
        """The `padding` in ``F.pad`` order (last dim first)."""
        return tuple(v for b, a in reversed(self.padding) for v in (b, a))

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a spatial `input_size`."""
        input_size = tuple(int(n) for n in input_size)
        if len(input_size) != self.ndim:
            raise ValueError(f"input size {input_size} has {len(input_size)} dims, geometry has {self.ndim}")
        if self.transposed:
            op = self.output_padding or (0,) * self.ndim
            return tuple(
                (n - 1) * s - b - a + d * (k - 1) + o + 1
                for n, s, (b, a), d, k, o in zip(
                    input_size, self.stride, self.padding, self.dilation, self.kernel_size, op
                )
            )
        return tuple(
            (n + b + a - e) // s + 1 for n, s, (b, a), e in zip(input_size, self.stride, self.padding, self.extent)
        )
