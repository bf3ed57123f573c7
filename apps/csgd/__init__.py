"""C-SGD (Centripetal SGD): train clusters of filters to become identical, then merge each cluster into one
channel exactly; residual-coupled groups share one clustering. `CSGD` is the method object the shared
training engine (`apps.engine.fit`) calls back."""

from .clusters import even_clusters, kmeans_clusters
from .config import CSGDConfig
from .method import CSGD, ClusterMergeReport, UnconvergedError

__all__ = [
    "CSGD",
    "CSGDConfig",
    "ClusterMergeReport",
    "UnconvergedError",
    "even_clusters",
    "kmeans_clusters",
]
