"""What a run's ``pretrained`` value names: a weights file, an OpenCLIP tag, or the project's demo backbone.

A module of its own, free of imports: the model loader (which reads the file) and a separated node's policy
(which loads files only from the directory its operator approved, and must not import torch before its worker
listens) apply the same rule.
"""

from __future__ import annotations

# the OpenCLIP config shipped in model_configs/ that ``pretrained = "demo"`` builds (common/models.py); also the
# run config's default model
DEMO_MODEL = "dpfpl-demo-tiny"
WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def names_weights_file(pretrained: str) -> bool:
    """Whether ``pretrained`` names a weights file (a path, or a checkpoint's file name) rather than a tag."""
    return any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith(WEIGHTS_FILE_SUFFIXES)
