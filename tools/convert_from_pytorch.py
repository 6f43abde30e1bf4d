#!/usr/bin/env python
"""PyTorch ViT weights (GPFM GitHub/HF release, timm or DINOv2 state dict, .safetensors) -> encoder bundle.

    python tools/convert_from_pytorch.py --torch GPFM.pth --out gpfm_bundle [--arch vit_large_patch14]
"""

import argparse
import json
import sys

from gpfm_jax.convert.student import ARCHS, convert_from_pytorch
from gpfm_jax.convert.torch_io import CheckpointError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", required=True, help=".pth/.pt/.bin or .safetensors file")
    parser.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="require this architecture (default: read the shapes)")
    parser.add_argument("--num-heads", type=int, help="head count, for non-standard widths")
    args = parser.parse_args(argv)
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    try:
        meta = convert_from_pytorch(args.torch, args.out, arch=args.arch, **overrides)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    vit = meta["vit"]
    print(f"wrote {args.out}: ViT d={vit['embed_dim']} depth={vit['depth']} patch={vit['patch_size']}")
    print(json.dumps(meta["provenance"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
