"""Channel dependency graph, coupled channel groups, MACs model and exact channel surgery.

g = trace(model, x)              # ChannelGraph: g.nx, g.groups, g.macs(widths), g.params(widths)
small = prune(model, x, {group_id: kept_indices})
register_rule(MyLayer, my_rule)  # teach the graph an op it has no rule for
"""

from .channel_graph import ChannelGraph, ChannelGroup, Member, Producer, trace
from .dead import DeadChannelReport, fold_dead_channels
from .errors import GraphTraceError, PruneError
from .flops import FlopsReport, NodeCost, flops
from .plan import PrunePlan
from .rules import Coupler, Unsupported, register_rule
from .saved import apply_plan, load_pruned, save_pruned
from .surgery import prune

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "Coupler",
    "DeadChannelReport",
    "FlopsReport",
    "GraphTraceError",
    "Member",
    "NodeCost",
    "Producer",
    "PruneError",
    "PrunePlan",
    "Unsupported",
    "apply_plan",
    "flops",
    "fold_dead_channels",
    "load_pruned",
    "prune",
    "register_rule",
    "save_pruned",
    "trace",
]
