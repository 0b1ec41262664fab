"""Save and load the GBLR layers of a model: only what :func:`gblr.convert_` (or training) changed.

    gblr.save_pretrained(model, "out/")                          # only the GBLR layers
    model = gblr.load_pretrained(base_model, "out/")             # a fresh base model + those layers

The format: a folder with ``gblr_config.json`` (format name and version, the gblr version, and
per layer its name, class, sizes, bias, dtype and structure: components, rank and sigma of a
:class:`gblr.GBLRLinear`, the blocks of a :class:`gblr.FrozenGBLRLinear`) and
``gblr_layers.safetensors`` holding only those layers' tensors, named
``"<layer name>.<tensor name>"``. No pickle: loading runs no code from the files. Everything
else comes from the base model at load time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from ._files import write_atomic, write_text_atomic
from .flops import Support
from .conv import ConvGeometry, FrozenGBLRConv2d, GBLRConv2d
from .frozen import SUPPORTS_KEY, FrozenGBLRLinear
from .linear import STRUCTURAL_NAMES, GBLRLinear, check_finite_structure
from .targets import is_linear, linear_features, module_device, replace_module

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "TENSORS_FILE", "load_pretrained", "save_pretrained"]

CONFIG_FILE = "gblr_config.json"
TENSORS_FILE = "gblr_layers.safetensors"
FORMAT = "gblr-layers"
FORMAT_VERSION = 1


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "gblr.save_pretrained / load_pretrained need the safetensors package: pip install gblr[hf]"
        ) from error
    return safetensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str, layer: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"layer {layer!r} in {CONFIG_FILE}: dtype must name a float torch dtype, got {name!r}")
    return dtype


def _layer_entry(name: str, layer: nn.Module) -> dict:
    entry = {
        "name": name,
        "class": type(layer).__name__,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, ConvGeometry):
        entry["conv"] = layer.geometry_config()
    if isinstance(layer, GBLRLinear):
        entry.update(components=layer.components, rank=layer.rank, sigma=layer.sigma, dtype=_dtype_name(layer.u.dtype))
        if layer.dense_blocks:
            entry["dense_blocks"] = layer.dense_blocks
    else:
        entry["dtype"] = _dtype_name(layer.dtype)
        entry["blocks"] = [
            {**dataclasses.asdict(support), "rank": None if right is None else left.shape[1]}
            for support, left, right in layer.blocks()
        ]
    return entry


def _tensor_key(layer: str, tensor: str) -> str:
    return f"{layer}.{tensor}" if layer else tensor


def _from_config(layer: nn.Module, key: str) -> bool:
    """State entries that the JSON already describes and loading rebuilds from it: a frozen
    layer's supports buffer (its blocks are in ``gblr_config.json``). Not written to the tensors
    file, so folders written before that buffer existed load the same way."""
    return isinstance(layer, FrozenGBLRLinear) and key == SUPPORTS_KEY


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the GBLR layers of ``model`` (trainable and frozen) to ``directory``.

    ``gblr_config.json`` describes each layer (name, class, sizes, structure, dtype);
    ``gblr_layers.safetensors`` holds only their tensors, named ``"<layer name>.<tensor name>"``.
    Everything else comes from the base model at :func:`load_pretrained`. Both files are written
    atomically (tensors first, the JSON that points to them last). Returns the directory.
    """
    safetensors = _safetensors()
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [
        (name, module) for name, module in model.named_modules() if isinstance(module, (GBLRLinear, FrozenGBLRLinear))
    ]
    if not layers:
        raise ValueError("the model has no GBLRLinear or FrozenGBLRLinear layer to save; run gblr.convert_ first")
    tensors = {}
    for name, layer in layers:
        for key, value in layer.state_dict().items():
            if isinstance(value, torch.Tensor) and not _from_config(layer, key):
                tensors[_tensor_key(name, key)] = value.detach().to("cpu").contiguous()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gblr_version": __version__,
        "tensors": TENSORS_FILE,
        "layers": [_layer_entry(name, layer) for name, layer in layers],
    }
    directory = Path(directory)
    data = safetensors.torch.save(tensors, metadata={"format": "pt", "gblr_format": FORMAT})
    write_atomic(directory / TENSORS_FILE, lambda handle: handle.write(data))
    write_text_atomic(directory / CONFIG_FILE, json.dumps(document, indent=2) + "\n")
    return directory


def _entry_value(entry: dict, key: str, kind, name: str):
    if key not in entry or not isinstance(entry[key], kind) or isinstance(entry[key], bool) and kind is int:
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: missing or malformed {key!r} (got {entry.get(key)!r})")
    return entry[key]


def _build_layer(entry: dict, name: str, device: torch.device) -> nn.Module:
    """The layer described by ``entry``, built on the meta device and moved (uninitialised) to ``device``."""
    in_features = _entry_value(entry, "in_features", int, name)
    out_features = _entry_value(entry, "out_features", int, name)
    bias = _entry_value(entry, "bias", bool, name)
    dtype = _dtype_from(entry.get("dtype"), name)
    kind = entry.get("class")
    conv = _conv_geometry(entry, name, in_features, out_features) if kind in CONV_CLASSES else None
    if kind in ("GBLRLinear", "GBLRConv2d"):
        structure = {"bias": bias, "components": _entry_value(entry, "components", int, name),
                     "rank": _entry_value(entry, "rank", int, name), "sigma": entry.get("sigma"), "device": "meta",
                     "dtype": dtype}
        if "dense_blocks" in entry:
            structure["dense_blocks"] = _entry_value(entry, "dense_blocks", int, name)
        layer = GBLRLinear(in_features, out_features, **structure) if conv is None else GBLRConv2d(**conv, **structure)
    elif kind in ("FrozenGBLRLinear", "FrozenGBLRConv2d"):
        blocks = []
        for block in _entry_value(entry, "blocks", list, name):
            support = Support(*(_entry_value(block, key, int, name) for key in ("in_start", "in_width", "out_start",
                                                                                  "out_width")))
            # A dense block (rank None) is stored as one (out_width, in_width) matrix; any rank at which
            # the constructor multiplies the factors out (min of the widths) rebuilds that shape.
            rank = block.get("rank") or min(support.in_width, support.out_width)
            left = torch.empty(support.out_width, rank, device="meta", dtype=dtype)
            right = torch.empty(rank, support.in_width, device="meta", dtype=dtype)
            blocks.append((support, left, right))
        bias_tensor = torch.empty(out_features, device="meta", dtype=dtype) if bias else None
        if conv is None:
            layer = FrozenGBLRLinear(in_features, out_features, blocks, bias_tensor, dtype=dtype, device="meta")
        else:
            in_channels, out_channels, kernel_size = (conv.pop(key) for key in ("in_channels", "out_channels",
                                                                               "kernel_size"))
            layer = FrozenGBLRConv2d(in_channels, out_channels, kernel_size, blocks, bias_tensor, **conv, dtype=dtype,
                                     device="meta")
    else:
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: class must be one of GBLRLinear, FrozenGBLRLinear, "
                         f"{', '.join(CONV_CLASSES)}; got {kind!r}")
    return layer.to_empty(device=device)


CONV_CLASSES = ("GBLRConv2d", "FrozenGBLRConv2d")


def _saved_geometry(config, name: str) -> ConvGeometry:
    """The geometry of a saved convolution's ``conv`` entry, or a ValueError naming the layer."""
    try:
        return ConvGeometry.from_config(config)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: malformed 'conv' geometry {config!r} ({error})") from None


def _conv_geometry(entry: dict, name: str, in_features: int, out_features: int) -> dict:
    """The constructor arguments of a saved convolution's geometry, checked against its sizes."""
    conv = _entry_value(entry, "conv", dict, name)
    geometry = _saved_geometry(conv, name)
    if (geometry.in_channels * geometry.taps, geometry.out_channels) != (in_features, out_features):
        raise ValueError(f"layer {name!r} in {CONFIG_FILE}: the 'conv' geometry {conv!r} does not match "
                         f"in_features={in_features}, out_features={out_features}")
    return geometry.geometry_config()


def _read_document(directory: Path) -> list:
    """The layer entries of ``directory``'s ``gblr_config.json``, after checking the format."""
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a directory written by gblr.save_pretrained?")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a gblr layers file (format {FORMAT!r} expected)")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {document.get('format_version')!r}; this gblr reads {FORMAT_VERSION}"
        )
    entries = document.get("layers")
    if not isinstance(entries, list):
        raise ValueError(f"{config_path}: 'layers' must be a list")
    return entries


def _module_to_replace(base_model: nn.Module, name: str, entry: dict, directory: Path) -> nn.Module:
    """The module of ``base_model`` that the saved layer ``name`` replaces, checked against ``entry``."""
    if name:
        try:
            base = base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} saved in {directory} has no module of that name in the model") from None
    else:
        base = base_model
    if not (is_linear(base) or isinstance(base, (GBLRLinear, FrozenGBLRLinear))):
        raise ValueError(
            f"layer {name!r}: the model's module there is a {type(base).__name__}, not an nn.Linear, Conv1D, "
            f"Conv2d or GBLR layer"
        )
    saved_conv, base_conv = entry.get("class") in CONV_CLASSES, isinstance(base, (nn.Conv2d, ConvGeometry))
    if saved_conv != base_conv:
        raise ValueError(
            f"layer {name!r}: saved as a {entry.get('class')}, but the model's module there is a "
            f"{type(base).__name__}; a convolution replaces only a convolution, a linear layer only a linear one"
        )
    if base_conv:
        saved_geometry = entry.get("conv")
        geometry = base if isinstance(base, ConvGeometry) else ConvGeometry.of_conv(base)
        if _saved_geometry(saved_geometry, name).sliding_window() != geometry.sliding_window():
            raise ValueError(f"layer {name!r}: saved as a convolution with {saved_geometry}, but the model's one has "
                             f"{geometry.geometry_config()}; the checkpoint is for a model of another shape")
    saved = (entry.get("in_features"), entry.get("out_features"))
    if linear_features(base) != saved:
        raise ValueError(
            f"layer {name!r}: saved with (in_features, out_features) = {saved}, but the model's module has "
            f"{linear_features(base)}; the checkpoint is for a model of another shape"
        )
    return base


def load_pretrained(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the GBLR layers saved by :func:`save_pretrained` into ``base_model``, in place.

    Each saved layer replaces the module of the same name, which must be an ``nn.Linear``, a
    ``Conv1D`` or a GBLR layer with the same in / out features. Tensors are loaded exactly, in
    their saved dtype, on the device of the module they replace. Every layer is checked and
    loaded before the first is put in, so an error leaves ``base_model`` as it was. Returns
    ``base_model`` (or the loaded layer, if the saved model was a single layer).
    """
    _safetensors()
    from safetensors import SafetensorError, safe_open

    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    directory = Path(directory)
    entries = _read_document(directory)
    tensors_path = directory / TENSORS_FILE
    try:
        with safe_open(str(tensors_path), framework="pt", device="cpu") as handle:
            new_layers = _load_layers(base_model, entries, handle, directory)
    except SafetensorError as error:
        raise ValueError(
            f"{tensors_path} is not a readable safetensors file ({error}): truncated or overwritten? Save the model "
            "again with gblr.save_pretrained"
        ) from None
    for name, layer in new_layers:
        if not name:  # the saved model was one layer: it cannot replace itself in place
            return layer
        replace_module(base_model, name, layer)
    return base_model


def _load_layers(base_model: nn.Module, entries: list, handle, directory: Path) -> list[tuple[str, nn.Module]]:
    """The saved layers, built from ``entries`` and filled from the open tensors file ``handle``,
    each checked against the module of ``base_model`` it is to replace."""
    tensors_path = directory / TENSORS_FILE
    new_layers = []
    available = set(handle.keys())
    used = set()
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{directory / CONFIG_FILE}: every layer needs a 'name' string, got {entry!r}")
        base = _module_to_replace(base_model, name, entry, directory)
        layer = _build_layer(entry, name, module_device(base) or torch.device("cpu"))
        with torch.no_grad():
            for key, value in layer.state_dict(keep_vars=True).items():
                if not isinstance(value, torch.Tensor) or _from_config(layer, key):
                    continue
                stored_key = _tensor_key(name, key)
                if stored_key not in available:
                    raise ValueError(f"layer {name!r}: tensor {stored_key!r} missing from {tensors_path}")
                tensor = handle.get_tensor(stored_key)
                if tuple(tensor.shape) != tuple(value.shape):
                    raise ValueError(
                        f"layer {name!r}: tensor {stored_key!r} has shape {tuple(tensor.shape)} in {tensors_path}, "
                        f"the layer described in {CONFIG_FILE} needs {tuple(value.shape)}"
                    )
                structural = isinstance(layer, GBLRLinear) and key in STRUCTURAL_NAMES
                if tensor.dtype != value.dtype and not (structural and tensor.is_floating_point()):
                    raise ValueError(
                        f"layer {name!r}: tensor {stored_key!r} has dtype {tensor.dtype} in {tensors_path}, the "
                        f"layer described in {CONFIG_FILE} needs {value.dtype}"
                    )
                # Structural parameters saved in another float dtype (files written before casts kept
                # them float32) are converted to the layer's structure dtype.
                value.copy_(tensor)
                used.add(stored_key)
        if isinstance(layer, GBLRLinear):
            check_finite_structure([layer], f"as loaded from {tensors_path}", names=[name],
                                   cause="the file is corrupt or was saved after a non-finite training step")
        layer.train(base.training)
        new_layers.append((name, layer))
    unexpected = sorted(available - used)
    if unexpected:
        raise ValueError(f"{tensors_path} holds tensors {CONFIG_FILE} does not describe: {unexpected[:5]}")
    return new_layers
