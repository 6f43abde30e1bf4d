#!/usr/bin/env python
"""An expert teacher's own PyTorch checkpoint -> encoder bundle for GPFM distillation / feature extraction.

    python tools/port_teacher.py --teacher uni    --torch UNI/pytorch_model.bin       --out bundles/uni
    python tools/port_teacher.py --teacher phikon --torch phikon/model.safetensors    --out bundles/phikon
    python tools/port_teacher.py --teacher conch  --torch CONCH/pytorch_model.bin     --out bundles/conch

Strict: every key of the file is used or explicitly ignored (Phikon's pooler, CONCH's text tower, ...), shapes are
checked, errors name the key; pickles are opened with weights_only=True (nothing in the file can run).
"""

import argparse
import json
import sys

from gpfm_jax.convert.teacher_port import FILE_KINDS, port_teacher
from gpfm_jax.convert.torch_io import CheckpointError
from gpfm_jax.models.teachers import TEACHERS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, choices=sorted(TEACHERS))
    parser.add_argument("--torch", required=True, help="; ".join(f"{k}: {v}" for k, v in FILE_KINDS.items()))
    parser.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        meta = port_teacher(args.teacher, args.torch, args.out)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    vit = meta["vit"]
    print(f"wrote {args.out}: teacher {meta['teacher']} ({meta['encoder']}), ViT d={vit['embed_dim']} "
          f"depth={vit['depth']} patch={vit['patch_size']} img={vit['img_size']}; targets {meta['target_dims']}")
    print(json.dumps(meta["provenance"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
