"""A user's own model factory, importable as ``tests_factory_module:make_linear`` (tests add this folder to sys.path)."""

import torch


def make_linear() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
