"""`pagellm quantize MODEL --method fp8|int8 [--smoothquant ALPHA] ... --output DIR`."""

from __future__ import annotations

import argparse
import json

from pagellm.quantize.checkpoint import METHODS
from pagellm.quantize.smoothing import DEFAULT_MAPPINGS, MAPPINGS


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a float model: HF folder or cached id, or a .gguf file (default: the embedded model)")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="fp8: e4m3 weights per channel, fp8 activations per token; int8: the same in int8")
    parser.add_argument("--output", "-o", required=True, help="the folder to write (absent or empty)")
    parser.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                        help="SmoothQuant strength in [0, 1] (0.5 is usual): scales from calibration activations "
                        "folded into the norms before quantizing; off when not given")
    parser.add_argument("--smooth-mappings", default=",".join(DEFAULT_MAPPINGS),
                        help=f"which inputs --smoothquant flattens, comma-separated, of {', '.join(MAPPINGS)} "
                        f"(default {','.join(DEFAULT_MAPPINGS)})")
    parser.add_argument("--gptq", action="store_true",
                        help="round the weights with GPTQ against the calibration inputs (else to nearest)")
    parser.add_argument("--calibration-file", default=None,
                        help="a UTF-8 text file to calibrate on (default: a built-in mixed text)")
    parser.add_argument("--max-calibration-tokens", type=int, default=2048)
    parser.add_argument("--rotate", type=int, default=None, metavar="BLOCK",
                        help="int8 only: rotate the residual stream (folded into the weights) and down_proj's input "
                        "(at run time, in orthogonal blocks of BLOCK, e.g. 128) so that outlier channels spread "
                        "before per-token rounding; not with --smoothquant")
    parser.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                        help="keep the linear layers whose HF module name fully matches REGEX in float, e.g. "
                        "'model\\.layers\\.0\\..*' (repeatable; lm_head is always kept)")


def run_quantize(args: argparse.Namespace) -> int:
    from pagellm.quantize.checkpoint import quantize_model

    text = None
    if args.calibration_file is not None:
        try:
            with open(args.calibration_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"calibration_file: cannot read {args.calibration_file} ({e})") from None
    summary = quantize_model(args.model, args.output, args.method, smoothquant=args.smoothquant,
                             calibration_text=text, ignore=args.ignore,
                             smooth_mappings=[m for m in args.smooth_mappings.split(",") if m], gptq=args.gptq,
                             max_calibration_tokens=args.max_calibration_tokens, rotate=args.rotate)
    print(json.dumps(summary))
    return 0
