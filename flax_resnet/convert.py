"""Weights between the PyTorch ResNets people hold and ``flax_resnet``: the converter's
Python API in one namespace, and ``python -m flax_resnet.convert SRC DST`` (its command
line, ``flax_resnet.convert_cli``).

Each job has its module: ``weights`` (``resolve`` any source into one ``Weights``; ``load``,
``load_pretrained``), ``state_dict`` (key names, layouts, the strict load and the export),
``architecture`` (``infer_config`` from a state_dict's keys), ``writers`` (PyTorch files,
Flax checkpoints, Hugging Face and timm directories), ``namings`` (every naming's key map),
``library_configs`` and ``preprocessing`` (what other libraries' directories say).
"""

from __future__ import annotations

import sys

from flax_resnet.architecture import infer_config
from flax_resnet.convert_cli import convert, main
from flax_resnet.namings import ConversionError
from flax_resnet.state_dict import (
    detect_naming,
    load_torch_state_dict,
    model_variables,
    to_flax_layout,
    to_numpy_state_dict,
    to_torch_layout,
    to_torch_ref_names,
    to_torch_state_dict,
    torch_key,
    torch_ref_key,
    torchvision_key,
)
from flax_resnet.weights import Weights, load, load_pretrained, read_state_dict, resolve
from flax_resnet.writers import save_flax, save_library_dir, save_pytorch, save_safetensors

__all__ = [
    "ConversionError", "Weights", "convert", "detect_naming", "infer_config", "load",
    "load_pretrained", "load_torch_state_dict", "main", "model_variables", "read_state_dict",
    "resolve", "save_flax", "save_library_dir", "save_pytorch", "save_safetensors",
    "to_flax_layout", "to_numpy_state_dict", "to_torch_layout", "to_torch_ref_names",
    "to_torch_state_dict", "torch_key", "torch_ref_key", "torchvision_key",
]


if __name__ == "__main__":
    sys.exit(main())
