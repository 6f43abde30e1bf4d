#!/usr/bin/env python
"""Encoder bundle or training checkpoint (EMA teacher backbone) -> PyTorch weights.

    python tools/convert_to_pytorch.py --checkpoint DIR [--step N] --format {timm,gpfm} --out FILE.pth|.safetensors

timm:  bare keys; loads with strict=True into
       timm.create_model('vit_large_patch14_dinov2', img_size=224, init_values=1e-5, num_classes=0)
gpfm:  the official release layout {'teacher': {'backbone.blocks.{c}.{i}.*', ...}} (.pth only)
"""

import argparse
import sys

from gpfm_jax.convert.student import EXPORT_FORMATS, convert_to_pytorch
from gpfm_jax.convert.torch_io import CheckpointError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="encoder bundle or gpfm-train checkpoint folder")
    parser.add_argument("--step", type=int, help="training checkpoint step (default: the latest)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--out", required=True, help=".pth or .safetensors")
    args = parser.parse_args(argv)
    try:
        out = convert_to_pytorch(args.checkpoint, args.out, args.format, args.step)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
