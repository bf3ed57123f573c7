"""Channel dependency graph, coupled channel groups, MACs model and exact channel surgery.

    g = trace(model, x)              # ChannelGraph: g.nx, g.groups, g.macs(widths), g.params(widths)
    small = prune(model, x, {group_id: kept_indices})
"""
from .channel_graph import ChannelGraph, ChannelGroup, Member, Producer, trace
from .dead import DeadChannelReport, fold_dead_channels
from .errors import GraphTraceError, PruneError
from .flops import FlopsReport, NodeCost, flops
from .plan import PrunePlan, apply_plan, load_pruned, save_pruned
from .surgery import prune

__all__ = ["ChannelGraph", "ChannelGroup", "Member", "Producer", "trace", "GraphTraceError", "PruneError", "prune", "flops", "FlopsReport", "NodeCost",
           "PrunePlan", "apply_plan", "save_pruned", "load_pruned", "fold_dead_channels", "DeadChannelReport"]
