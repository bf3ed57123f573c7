"""Channel spaces: one per tensor dimension (of an fx node's output or of a parameter/buffer).

Two kinds of coupling join them. An *identity union* says two spaces are the same channels in the
same order (elementwise ops, BN, permutes, ...) and is kept in a union-find over spaces. An
*index link* says element `i[k]` of space `a` is the same channel as element `j[k]` of space `b`
(concat offsets, slices, reshapes, grouped convs) and is resolved later, per element, by
connected components. A space can be *poisoned* with the reason its size may not change; single
elements are poisoned through a synthetic space (key `"#fixed"`) linked to them.
"""

from __future__ import annotations

import numpy as np

from .errors import GraphTraceError

SpaceKey = tuple[str, int, int]  # (tensor key, output index, dim); parameters use key "@<qualified name>",
# synthetic spaces of `poison_elements` key "#fixed"


class SpaceSet:
    """Union-find over channel spaces, plus index links and poison reasons."""

    def __init__(self) -> None:
        self.index: dict[SpaceKey, int] = {}
        self.keys: list[SpaceKey] = []
        self.size: list[int] = []
        self.parent: list[int] = []
        self.produced: list[bool] = []  # per root: holds a producer's output rows
        self.links: list[tuple[int, np.ndarray, int, np.ndarray]] = []
        self.poison: dict[int, str] = {}

    def space(self, key: SpaceKey, size: int) -> int:
        sid = self.index.get(key)
        if sid is None:
            sid = len(self.keys)
            self.index[key] = sid
            self.keys.append(key)
            self.size.append(int(size))
            self.parent.append(sid)
            self.produced.append(False)
        return sid

    def find(self, s: int) -> int:
        parent = self.parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:
            parent[s], s = root, parent[s]
        return root

    def union(self, a: int, b: int, where: str) -> None:
        """The two spaces are the same channels in the same order."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise GraphTraceError(
                f"at {where}: cannot couple {self.keys[a]} (size {self.size[a]}) "
                f"with {self.keys[b]} (size {self.size[b]})"
            )
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.produced[ra] = self.produced[ra] or self.produced[rb]

    def link(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        """Element `ia[k]` of space `a` is the same channel as element `ib[k]` of space `b`."""
        self.links.append((a, np.asarray(ia, dtype=np.int64), b, np.asarray(ib, dtype=np.int64)))

    def mark_produced(self, s: int) -> None:
        self.produced[self.find(s)] = True

    def is_produced(self, s: int) -> bool:
        return self.produced[self.find(s)]

    def poison_space(self, s: int, reason: str) -> None:
        if self.size[s] > 1:
            self.poison.setdefault(s, reason)

    def poison_elements(self, s: int, idx: np.ndarray, reason: str) -> None:
        """Elements `idx` of space `s` may not be removed (the rest of `s` may): they are linked to a
        synthetic poisoned space, so exactly the logical channels holding them are fixed."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return
        fixed = self.space(("#fixed", len(self.keys), 0), len(idx))
        self.poison[fixed] = reason
        self.link(fixed, np.arange(len(idx)), s, idx)

    def roots(self) -> np.ndarray:
        return np.fromiter((self.find(s) for s in range(len(self.keys))), dtype=np.int64, count=len(self.keys))
