"""Global channel selection shared by the pruning methods: ranking, MACs target, per-round budget, minimum
widths, whole-chunk removal, and the fill back up to the target."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from apps.engine.selection import fill_to_target, global_order, select_masks


def additive_macs(costs):
    return lambda widths: sum(c * w for c, w in zip(costs, widths))


def literal_walk(scores, costs, target, min_keep, budget):
    """The selection written as the plain walk (multiple 1): stop at the target, skip groups at
    their minimum (not consuming the budget), stop once `budget` channels are masked."""
    widths = [s.numel() for s in scores]
    order = sorted(((float(s[c]), g, c) for g, s in enumerate(scores) for c in range(s.numel())))
    masked = []
    for _, g, c in order:
        if sum(k * w for k, w in zip(costs, widths)) <= target or (budget is not None and len(masked) >= budget):
            break
        if widths[g] <= min_keep[g]:
            continue
        widths[g] -= 1
        masked.append((g, c))
    return sorted(masked)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 9)) for _ in range(n)]
    # distinct scores so that the literal walk's tie order cannot differ
    values = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=sum(sizes), max_size=sum(sizes), unique=True))
    scores, i = [], 0
    for s in sizes:
        scores.append(torch.tensor(values[i : i + s], dtype=torch.float64))
        i += s
    costs = [draw(st.integers(1, 50)) for _ in range(n)]
    min_keep = [draw(st.integers(1, s)) for s in sizes]
    base = sum(c * s for c, s in zip(costs, sizes))
    target = draw(st.floats(0.05, 0.99)) * base
    budget = draw(st.one_of(st.none(), st.integers(0, sum(sizes))))
    return scores, costs, min_keep, target, budget


def masked_pairs(masks):
    return sorted((g, c) for g, m in enumerate(masks) for c in (~m).nonzero().flatten().tolist())


@given(problems())
def test_selection_equals_the_literal_walk(problem):
    scores, costs, min_keep, target, budget = problem
    masks = select_masks(scores, macs=additive_macs(costs), target_macs=target, min_keep=min_keep, budget=budget)
    assert masked_pairs(masks) == literal_walk(scores, costs, target, min_keep, budget)


@given(problems())
def test_selection_invariants(problem):
    scores, costs, min_keep, target, budget = problem
    macs = additive_macs(costs)
    masks = select_masks(scores, macs=macs, target_macs=target, min_keep=min_keep, budget=budget)
    widths = [int(m.sum()) for m in masks]
    masked = masked_pairs(masks)
    assert all(w >= k for w, k in zip(widths, min_keep))
    if budget is not None:
        assert len(masked) <= budget
    if macs(widths) > target:  # target missed: the budget ran out or every group is at its minimum
        assert (budget is not None and len(masked) == budget) or widths == min_keep
    elif masked:  # the shortest walk: one channel fewer would miss the target
        worst = max(masked, key=lambda gc: float(scores[gc[0]][gc[1]]))
        back = list(widths)
        back[worst[0]] += 1
        assert macs(back) > target
    # global ranking: a kept channel scoring below a masked one sits in a group at its minimum
    if masked:
        top = max(float(scores[g][c]) for g, c in masked)
        for g, m in enumerate(masks):
            for c in m.nonzero().flatten().tolist():
                if float(scores[g][c]) < top:
                    assert widths[g] == min_keep[g]


@given(problems())
def test_fill_grows_widths_up_to_the_target_and_no_further(problem):
    scores, costs, min_keep, target, _ = problem
    macs = additive_macs(costs)
    masks = select_masks(scores, macs=macs, target_macs=target, min_keep=min_keep)
    widths = [int(m.sum()) for m in masks]
    grown = fill_to_target(widths, scores, macs=macs, target_macs=target)
    if macs(widths) > target:  # out of reach: unchanged
        assert grown == widths
        return
    assert macs(grown) <= target and all(w <= g <= s.numel() for w, g, s in zip(widths, grown, scores))
    for g, s in enumerate(scores):  # maximal: no group can take one more channel
        assert grown[g] == s.numel() or macs([w + (i == g) for i, w in enumerate(grown)]) > target


def test_skipped_channels_do_not_consume_the_budget():
    # group 0 (min 1 of 2) holds the two lowest scores; its second channel is skipped, not counted
    scores = [torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])]
    masks = select_masks(scores, macs=additive_macs([1, 1]), target_macs=0.0, min_keep=[1, 1], budget=3)
    assert masked_pairs(masks) == [(0, 0), (1, 0), (1, 1)]


def test_selection_starts_from_full_widths_and_can_unmask():
    macs = additive_macs([1, 1])
    first = select_masks(
        [torch.tensor([0.1, 0.9]), torch.tensor([0.8, 0.7])], macs=macs, target_macs=3, min_keep=[1, 1]
    )
    assert masked_pairs(first) == [(0, 0)]
    # channel (0, 0) grew: it is kept again and the new weakest is masked
    second = select_masks(
        [torch.tensor([0.95, 0.9]), torch.tensor([0.8, 0.7])], macs=macs, target_macs=3, min_keep=[1, 1]
    )
    assert masked_pairs(second) == [(1, 1)]


def test_multiple_removes_whole_chunks():
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0]), torch.tensor([1.0, 2.0])]
    masks = select_masks(scores, macs=additive_macs([1, 1]), target_macs=5, min_keep=[2, 1], multiple=[2, 1])
    assert [int(m.sum()) for m in masks] == [2, 2]  # group 0 drops 4 (two chunks of 2), not 1 or 3
    assert masks[0].tolist() == [False, False, False, False, True, True]


def test_ties_break_by_group_then_channel():
    scores = [torch.ones(3), torch.ones(2)]
    assert global_order(scores) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
