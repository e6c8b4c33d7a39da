"""Offline quantization (`pagellm quantize`): a float model -> a compressed-tensors W8A8 checkpoint folder.

    calibration.py  run the float model over a text, keep each linear input's per-channel max |x|
    smoothing.py    SmoothQuant scales folded into the norms (and up/v projections) before quantizing
    checkpoint.py   read the float checkpoint, smooth, quantize per channel, write the folder
    cli.py          the `pagellm quantize` subcommand's arguments
"""

from pagellm.quantize.checkpoint import METHODS, quantize_model

__all__ = ["METHODS", "quantize_model"]
