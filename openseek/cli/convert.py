"""`openseek convert`: rewrite a checkpoint in another dtype, or quantised, tokenizer files copied."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint in another dtype (fp8 blocks dequantised) or quantised "
                                       "(int8, int4), tokenizer files copied",
                       description="Load SRC (any layout load_pretrained reads; MTP layers are not carried over) and "
                                   "write it to DST in the hub layout at --dtype; with --quantize, in "
                                   "compressed-tensors' int8 / int4 layout, which openseek and vLLM load.")
    p.add_argument("src", metavar="SRC", help="checkpoint folder")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantisation of every matmul weight but the router's (and lm_head's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: input columns per scale (default: 128, or the largest smaller size dividing every "
                        "weight's input dimension)")
    p.add_argument("--quantize-head", action="store_true", help="quantise lm_head too")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from ..model import load_pretrained, save_pretrained
    from ..tokenizer import TOKENIZER_FILES

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UsageError(f"model path {src} is not a directory")
    if dst.resolve() == src.resolve():
        raise UsageError("DST must differ from SRC: the weights are read while DST is written")
    try:
        model = load_pretrained(src, dtype=getattr(torch, args.dtype), quantization=args.quantize,
                                group_size=args.group_size, quantize_head=args.quantize_head)
        save_pretrained(model, dst)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    print(f"wrote {dst} ({args.dtype}{', ' + args.quantize if args.quantize else ''})")
    return 0
