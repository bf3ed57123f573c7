"""reparam: structural re-parameterization for PyTorch.

Train a network in a multi-branch form, deploy an exactly equivalent plain one
(`reparam.merge`), and remove channels across coupled groups (`reparam.graph`).
"""
__version__ = "0.1.0"
