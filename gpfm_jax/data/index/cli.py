"""gpfm-index: build a memory-mapped tile index once, offline; inspect and verify it.

    gpfm-index build --json INDEX.json [--root DIR] --out DIR        the official {slide_dir: [file, ...]} index
    gpfm-index build --folder DIR --out DIR                          every image file under DIR
    gpfm-index build --slides LIST|GLOB --out DIR [--tile-size 224 --magnification 20 --min-tissue 0.5 --workers N]
    gpfm-index pack INDEX --out DIR|gs://BUCKET/DIR [--shard-mb 256 --shard-records 16384 --workers 8]
    gpfm-index info DIR                                              (a packed folder too)
    gpfm-index verify DIR [--sample N] [--no-hashes]                 (a packed folder: counts and hashes per shard)

Exit status: 0 ok, 1 verify found problems, 2 bad arguments or input (the message names the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from gpfm_jax.data.index import packed
from gpfm_jax.data.index.store import IndexFormatError, TileIndex
from gpfm_jax.storage import StorageError


def _say(msg: str) -> None:
    print(f"gpfm-index: {msg}", file=sys.stderr, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def cmd_build(args: argparse.Namespace) -> int:
    from gpfm_jax.data.index import build_files, build_slides

    t0 = time.time()
    progress = lambda n: _say(f"{n:,} tiles ({time.time() - t0:.0f} s)")  # noqa: E731
    if args.json:
        out = build_files.build_from_json(args.json, args.out, args.root, overwrite=args.overwrite, progress=progress)
    elif args.folder:
        out = build_files.build_from_folder(args.folder, args.out, overwrite=args.overwrite, progress=progress)
    else:
        out = build_slides.build_from_slides(args.slides, args.out, tile_size=args.tile_size,
                                             magnification=args.magnification, min_tissue=args.min_tissue,
                                             workers=args.workers, overwrite=args.overwrite, report=_say)
    index = TileIndex(out)
    _say(f"wrote {out}: {index.num_tiles:,} tiles in {index.num_slides:,} slides, {time.time() - t0:.1f} s")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from gpfm_jax.data.index import pack

    t0 = time.time()
    out = pack.pack(args.index, args.out, shard_mb=args.shard_mb, shard_records=args.shard_records,
                    workers=args.workers, root=args.root, overwrite=args.overwrite, report=_say)
    m = packed.read_manifest(out)
    _say(f"wrote {out}: {m['num_records']:,} records in {len(m['shards'])} shards, "
         f"{_human(sum(s['bytes'] for s in m['shards']))}, {time.time() - t0:.1f} s")
    return 0


def describe_packed(folder: str) -> dict:
    m = packed.read_manifest(folder)
    sizes = [s["bytes"] for s in m["shards"]]
    return {"folder": folder, "kind": "packed", "records": m["num_records"], "slides": m.get("num_slides"),
            "shards": len(sizes), "bytes": sum(sizes), "shard_bytes_max": max(sizes, default=0),
            "records_per_shard_max": max((s["records"] for s in m["shards"]), default=0),
            "encoding": m["encoding"], "empty_records": m["empty_records"], "source": m["source"], "build": m["build"]}


def describe(index: TileIndex) -> dict:
    """What `info` prints: counts, sizes, provenance."""
    m = index.manifest
    arrays = {name: a["bytes"] for name, a in m["arrays"].items()}
    blobs = sum(b for name, b in arrays.items() if name.endswith(".bin"))
    fixed = sum(arrays.values()) - blobs
    out = {"folder": str(index.folder), "kind": m["kind"], "tiles": m["num_tiles"], "slides": m["num_slides"],
           "bytes": sum(arrays.values()), "bytes_per_tile_without_names": round(fixed / max(m["num_tiles"], 1), 2),
           "name_blob_bytes": blobs, "arrays": arrays, "build": m["build"]}
    for key in ("root", "tile_size", "empty_slides", "num_skipped_slides", "num_unreadable_folders"):
        if key in m:
            out[key] = m[key]
    return out


def cmd_info(args: argparse.Namespace) -> int:
    if packed.is_packed(args.dir):
        d = describe_packed(args.dir)
        if args.json:
            print(json.dumps(d, indent=1))
            return 0
        print(f"{d['folder']}: packed, {d['records']:,} records in {d['shards']} shards, {_human(d['bytes'])} "
              f"(largest shard {_human(d['shard_bytes_max'])}, at most {d['records_per_shard_max']:,} records)")
        print(f"  encoding: {d['encoding']}; empty records (unreadable tiles): {d['empty_records']}")
        print(f"  from the {d['source']['kind']} index {d['source']['index']} (copy: {d['folder']}/index; "
              f"record i = its tile i)")
        b = d["build"]
        print(f"  packed {b.get('created')} on {b.get('host')} in {b.get('seconds')} s")
        return 0
    d = describe(TileIndex(args.dir))
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{d['folder']}: kind {d['kind']}, {d['tiles']:,} tiles, {d['slides']:,} slides")
    print(f"  on disk {_human(d['bytes'])}: {d['bytes_per_tile_without_names']} bytes per tile + "
          f"{_human(d['name_blob_bytes'])} of names")
    for key in ("root", "tile_size", "empty_slides", "num_skipped_slides", "num_unreadable_folders"):
        if key in d:
            print(f"  {key}: {d[key]}")
    b = d["build"]
    settings = ", ".join(f"{k}={v}" for k, v in b.items() if k not in ("created", "host", "seconds"))
    print(f"  built {b.get('created')} on {b.get('host')} in {b.get('seconds')} s ({settings})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gpfm_jax.data.index.sources import SlideIndexSource, TileIndexSource
    from gpfm_jax.data.sources import BadImageError

    if packed.is_packed(args.dir):
        bad = packed.verify(args.dir, hashes=not args.no_hashes)
        for line in bad:
            print(line)
        m = packed.read_manifest(args.dir)
        _say(f"{len(m['shards'])} shards, {m['num_records']:,} records: "
             + ("ok" if not bad else f"{len(bad)} problems"))
        return 1 if bad else 0
    index = TileIndex(args.dir)
    problems = 0
    if not args.no_hashes:
        bad = index.verify_hashes()
        for name in bad:
            print(f"hash mismatch: {Path(args.dir) / name}")
        problems += len(bad)
        _say(f"content hashes: {'ok' if not bad else f'{len(bad)} files differ'}")
    source = TileIndexSource(args.dir, args.root) if index.kind == "files" else SlideIndexSource(args.dir)
    n = min(args.sample, len(source))
    picks = np.sort(np.random.default_rng(args.seed).choice(len(source), n, replace=False)) if n else []
    unreadable = 0
    for i in picks:
        try:
            source[int(i)]
        except BadImageError as e:
            unreadable += 1
            print(f"unreadable tile {int(i)}: {e}")
    problems += unreadable
    _say(f"read {n} random tiles: {n - unreadable} ok, {unreadable} unreadable")
    return 1 if problems else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpfm-index", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an index folder")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", help="the official JSON index {slide_dir: [tile file, ...]}")
    src.add_argument("--folder", help="a folder of tile images (recursive)")
    src.add_argument("--slides", help="a text file of slide paths (one per line) or a glob ('**' recursive)")
    b.add_argument("--out", required=True, help="the index folder to write")
    b.add_argument("--root", help="--json: the folder relative slide dirs resolve against (default: the JSON's)")
    b.add_argument("--tile-size", type=int, default=224)
    b.add_argument("--magnification", type=float, default=20.0)
    b.add_argument("--min-tissue", type=float, default=0.5)
    b.add_argument("--workers", type=int, default=0, help="--slides: tiling processes (0 = all cores)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.set_defaults(fn=cmd_build)
    p = sub.add_parser("pack", help="pack an index's tiles into ArrayRecord shards (local folder or gs://)")
    p.add_argument("index", help="a built index folder (gpfm-index build)")
    p.add_argument("--out", required=True, help="the folder or gs:// URL to write the shards to")
    p.add_argument("--shard-mb", type=float, default=256.0, help="close a shard at this many MB (default 256)")
    p.add_argument("--shard-records", type=int, default=16384,
                   help="close a shard at this many records (default 16384: keeps the offloaded reader's per-read "
                        "footer cost small, see docs/storage.md)")
    p.add_argument("--workers", type=int, default=8, help="threads reading tiles (default 8)")
    p.add_argument("--root", help="files index: read tiles under this root instead of the recorded one")
    p.add_argument("--overwrite", action="store_true", help="replace a packed index at --out")
    p.set_defaults(fn=cmd_pack)
    i = sub.add_parser("info", help="counts, sizes and provenance of an index")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(fn=cmd_info)
    v = sub.add_parser("verify", help="check content hashes and read random tiles")
    v.add_argument("dir")
    v.add_argument("--sample", type=int, default=1000, help="random tiles to read (default 1000)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--root", help="files index: read tiles under this root instead of the recorded one")
    v.add_argument("--no-hashes", action="store_true", help="skip the content hashes (they read every byte)")
    v.set_defaults(fn=cmd_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "build" and args.root and not args.json:
        parser().error("--root goes with --json")
    try:
        return args.fn(args)
    except (FileNotFoundError, FileExistsError, IndexFormatError, ValueError, StorageError) as e:
        _say(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
