"""The folder layout of a gpfm-train checkpoint, as far as readers outside training need it: one description that
`train/checkpoint.py` (the writer) and `convert/student.py` (tools/convert_to_pytorch.py, gpfm-extract: readers)
both take their names from.

    <workdir>/checkpoints/encoder.json   the student's encoder bundle meta (train/encoder_meta.py)
    <workdir>/checkpoints/<step>/state   the TrainState as a plain tree (train/checkpoint.state_to_tree); the EMA
                                         teacher's backbone at TEACHER_BACKBONE (what the official release ships)
    <workdir>/checkpoints/<step>/data    the data stream's position

It lives in convert, not in train/checkpoint.py, because convert sits below train: convert may not import train.
"""

from __future__ import annotations

from typing import Any

CHECKPOINT_DIR = "checkpoints"  # in a gpfm-train workdir
STATE, DATA = "state", "data"  # the orbax items of one step
TEACHER_BACKBONE = ("teacher", "backbone")  # the EMA teacher's backbone params in the STATE tree


def teacher_backbone(state_tree: dict[str, Any]) -> Any:
    """The EMA teacher's backbone params of a restored STATE tree (KeyError if the tree has none)."""
    tree = state_tree
    for key in TEACHER_BACKBONE:
        tree = tree[key]
    return tree


def teacher_backbone_path() -> str:
    """'state/teacher/backbone': where the params are, as the encoder meta's provenance names it."""
    return "/".join((STATE, *TEACHER_BACKBONE))
