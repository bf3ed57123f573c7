"""SFP and CR-SFP: soft filter pruning (zero the weakest filters after every epoch, let them regrow) and its
consistent-representation variant (the pruned and the unpruned network trained together), with an exact
physical export of the narrow network. `SFP` is the method object the shared engine calls back."""

from .config import SFPConfig
from .criteria import fpgm_scores, l2_scores, taylor_scores
from .export import ExportReport, InexactExportError, export_narrow
from .method import SFP, CRSFPNet

__all__ = [
    "CRSFPNet",
    "ExportReport",
    "InexactExportError",
    "SFP",
    "SFPConfig",
    "export_narrow",
    "fpgm_scores",
    "l2_scores",
    "taylor_scores",
]
