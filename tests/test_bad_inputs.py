"""Bad and unusual inputs to the public Python API, in one table: every one raises an exception
whose message names the argument (or the layer, file or batch at fault); none returns a silently
wrong result.

The table covers the trainable layer (constructor arguments, forward inputs, sigma, product,
non-finite structure, state dicts), the frozen layer (inputs, kernel, tile, blocks, state dicts
of other supports), ``gblr.gaudi_mask``, ``GBLRConfig`` and ``gblr.convert_``,
``gblr.decompose`` / ``svd_decompose`` / ``relative_error`` / ``InputStats``,
``save_pretrained`` / ``load_pretrained`` (bad directories and files corrupted in ``tmp_path``),
``param_groups`` / ``StructureLearner``, ``gblr.distill``, ``gblr.flops_report``,
``gblr.explain`` and ``gblr.structures``. Each row is ``(id, call, exception type, regex)``;
``call`` takes a scratch directory. Many of these are also tested beside their module; this is
the single overview. The CLI's bad inputs are tested in tests/test_cli.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gblr
from gblr.flops import Support
from gblr.kernels import segmented

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest

NAN, INF = float("nan"), float("inf")


# -- small things the calls are made of -------------------------------------------------------------


def layer(**kwargs) -> gblr.GBLRLinear:
    torch.manual_seed(0)
    return gblr.GBLRLinear(16, 8, **kwargs)


def with_value(name: str, index: int, value: float) -> gblr.GBLRLinear:
    """A layer whose structural parameter ``name`` holds ``value`` at ``index``."""
    result = layer()
    with torch.no_grad():
        getattr(result, name)[index] = value
    return result


def frozen(**kwargs) -> gblr.FrozenGBLRLinear:
    result = layer().freeze()
    for key, value in kwargs.items():
        setattr(result, key, value)
    return result


def frozen_blocks(blocks, **kwargs) -> gblr.FrozenGBLRLinear:
    return gblr.FrozenGBLRLinear(16, 8, blocks, None, **kwargs)


def moved_frozen_state() -> dict:
    """The state of a frozen layer with the same block shapes as ``frozen()`` but other places."""
    other = layer()
    with torch.no_grad():
        other.in_location.add_(0.25)
    return other.freeze().state_dict()


def dense_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def gblr_model() -> nn.Sequential:
    return nn.Sequential(layer(), nn.ReLU(), gblr.GBLRLinear(8, 4))


def convert(config=None, calibration=None, model=None):
    model = dense_model() if model is None else model
    return gblr.convert_(model, config, calibration, progress=False, verbose=False)


def nan_batches() -> list[torch.Tensor]:
    batches = [torch.randn(3, 16) for _ in range(3)]
    batches[1][0, 2] = NAN
    return batches


def learner(model=None, optimizer=None, **kwargs):
    model = gblr_model() if model is None else model
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3)) if optimizer is None else optimizer
    arguments = {"flops_target": 0.5, "total_steps": 10, **kwargs}
    return gblr.StructureLearner(model, optimizer, **arguments)


def frozen_structure_model() -> nn.Sequential:
    model = gblr_model()
    model.requires_grad_(False)
    return model


def distill(**kwargs):
    teacher = dense_model()
    student = dense_model()
    convert(gblr.GBLRConfig(method="svd", allocation="uniform"), model=student)
    arguments = {"student": student, "teacher": teacher, "batches": [torch.randn(4, 16)], "steps": 2,
                 "progress": False, **kwargs}
    return gblr.distill(**arguments)


def saved(tmp, model=None):
    """A folder written by save_pretrained (a converted model by default)."""
    pytest.importorskip("safetensors")
    if model is None:
        model = dense_model()
        convert(gblr.GBLRConfig(method="svd", allocation="uniform"), model=model)
    gblr.save_pretrained(model, tmp)
    return tmp


def edited_config(tmp, edit, model=None):
    """A saved folder whose gblr_config.json went through ``edit(document)``."""
    folder = saved(tmp, model)
    path = folder / "gblr_config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return folder


def edited_tensors(tmp, edit):
    """A saved folder whose tensors went through ``edit(tensors)`` (a dict, changed in place)."""
    import safetensors.torch

    folder = saved(tmp)
    path = folder / "gblr_layers.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path))
    return folder


def load(folder, model=None):
    return gblr.load_pretrained(dense_model() if model is None else model, folder)


def set_entry(key, value, layer_index=0):
    def edit(document):
        document["layers"][layer_index][key] = value
    return edit


def frozen_folder(tmp, edit):
    model = dense_model()
    convert(gblr.GBLRConfig(method="svd", allocation="uniform"), model=model)
    gblr.freeze_(model)
    return edited_config(tmp, edit, model)


def set_block(key, value):
    def edit(document):
        document["layers"][0]["blocks"][0][key] = value
    return edit


def broken_json(tmp):
    folder = saved(tmp)
    (folder / "gblr_config.json").write_text("{")
    return folder


def distill_into_itself():
    model = gblr_model()
    return gblr.distill(model, model, [torch.randn(2, 16)], 1)


def truncated(tmp):
    folder = saved(tmp)
    path = folder / "gblr_layers.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return folder


def weight(*shape, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(*shape).to(dtype)


def nan_weight():
    result = weight(8, 8)
    result[3, 3] = NAN
    return result


def empty_report_ratio():
    return gblr.flops_report(dense_model()).ratio


GBLR_TRITON = [] if segmented.available() else [
    ("frozen kernel=triton without Triton", lambda tmp: frozen(kernel="triton"), ValueError,
     r"kernel='triton' needs Triton"),
]

# -- the table ------------------------------------------------------------------------------------------

CASES = [
    # GBLRLinear: constructor
    ("in_features=0", lambda tmp: gblr.GBLRLinear(0, 4), ValueError, r"^in_features must be a positive int"),
    ("out_features=-1", lambda tmp: gblr.GBLRLinear(4, -1), ValueError, r"^out_features must be a positive int"),
    ("in_features float", lambda tmp: gblr.GBLRLinear(4.0, 4), ValueError, r"^in_features must be a positive int"),
    ("in_features bool", lambda tmp: gblr.GBLRLinear(True, 4), ValueError, r"^in_features must be a positive int"),
    ("components=0", lambda tmp: layer(components=0), ValueError, r"^components must be a positive int"),
    ("rank=0", lambda tmp: layer(rank=0), ValueError, r"^rank must be a positive int"),
    ("rank above min(in, out)", lambda tmp: layer(rank=10**6), ValueError,
     r"^rank must be at most min\(in_features, out_features\) = 8, got 1000000"),
    ("sigma negative", lambda tmp: layer(sigma=-1.0), ValueError, r"^sigma must be None"),
    ("sigma nan", lambda tmp: layer(sigma=NAN), ValueError, r"^sigma must be None"),
    ("sigma inf", lambda tmp: layer(sigma=INF), ValueError, r"^sigma must be None"),
    ("init_flops_ratio=0", lambda tmp: layer(init_flops_ratio=0.0), ValueError, r"^init_flops_ratio must be"),
    ("init_flops_ratio=1.5", lambda tmp: layer(init_flops_ratio=1.5), ValueError, r"^init_flops_ratio must be"),
    ("init_flops_ratio nan", lambda tmp: layer(init_flops_ratio=NAN), ValueError, r"^init_flops_ratio must be"),
    ("init_full_width_share<0", lambda tmp: layer(init_full_width_share=-0.1), ValueError,
     r"^init_full_width_share must be"),
    ("product unknown", lambda tmp: layer(product="dense"), ValueError, r"^product must be one of"),
    # GBLRLinear: attributes
    ("set sigma=0", lambda tmp: setattr(layer(), "sigma", 0), ValueError, r"^sigma must be None"),
    ("set product", lambda tmp: setattr(layer(), "product", "fast"), ValueError, r"^product must be one of"),
    # GBLRLinear: forward inputs
    ("input of wrong width", lambda tmp: layer()(torch.randn(2, 15)), ValueError, r"^input must have in_features=16"),
    ("scalar input", lambda tmp: layer()(torch.tensor(1.0)), ValueError, r"^input must have in_features=16"),
    ("input not a tensor", lambda tmp: layer()([[0.0] * 16]), TypeError, r"^input must be a torch.Tensor"),
    ("integer input", lambda tmp: layer()(torch.randint(-3, 4, (2, 16))), ValueError,
     r"^input must be a floating point tensor of dtype torch.float32"),
    ("bool input", lambda tmp: layer()(torch.ones(2, 16, dtype=torch.bool)), ValueError,
     r"^input must be a floating point tensor"),
    ("float64 input, float32 layer", lambda tmp: layer()(torch.randn(2, 16, dtype=torch.float64)), ValueError,
     r"^input has dtype torch.float64 but GBLRLinear\(in_features=16, out_features=8\) has dtype torch.float32"),
    ("float32 input, bfloat16 layer", lambda tmp: layer(dtype=torch.bfloat16)(torch.randn(2, 16)), ValueError,
     r"^input has dtype torch.float32 but .* has dtype torch.bfloat16"),
    # GBLRLinear: non-finite structure, wherever it is used
    ("nan width: forward", lambda tmp: with_value("in_width", 2, NAN)(torch.randn(2, 16)), ValueError,
     r"^GBLRLinear\(in_features=16, out_features=8\): in_width contain NaN or infinite values in forward"),
    ("nan width: flops()", lambda tmp: with_value("out_width", 0, NAN).flops(), ValueError,
     r"out_width contain NaN or infinite values in flops\(\)"),
    ("inf location: freeze()", lambda tmp: with_value("in_location", 1, INF).freeze(), ValueError,
     r"in_location contain NaN or infinite values in freeze\(\)"),
    ("nan location: supports()", lambda tmp: with_value("out_location", 1, NAN).supports(), ValueError,
     r"out_location contain NaN or infinite values in supports\(\)"),
    ("nan width: structure_of", lambda tmp: gblr.linear.structure_of([layer(), with_value("in_width", 0, NAN)]),
     ValueError, r"in_width contain NaN or infinite values in structure_of\(\)"),
    ("nan width in a state dict", lambda tmp: layer().load_state_dict(with_value("in_width", 0, NAN).state_dict()),
     RuntimeError, r"GBLRLinear\(in_features=16, out_features=8\).*in_width in the state dict contain NaN"),
    ("state dict of another shape", lambda tmp: layer().load_state_dict(gblr.GBLRLinear(16, 4).state_dict()),
     RuntimeError, r"size mismatch for u"),
    # FrozenGBLRLinear
    ("frozen kernel unknown", lambda tmp: frozen(kernel="fast"), ValueError, r"^kernel must be one of"),
    *GBLR_TRITON,
    ("frozen tile=0", lambda tmp: frozen_blocks([], tile=0), ValueError, r"^tile must be a positive int"),
    ("frozen tile float", lambda tmp: frozen_blocks([], tile=2.5), ValueError, r"^tile must be a positive int"),
    ("frozen in_features=0", lambda tmp: gblr.FrozenGBLRLinear(0, 8, [], None), ValueError, r"^in_features"),
    ("frozen block of wrong shape",
     lambda tmp: frozen_blocks([(Support(0, 4, 0, 2), torch.randn(2, 1), torch.randn(1, 5))]), ValueError,
     r"^block factors of shapes \(2, 1\) and \(1, 5\) do not match support"),
    ("frozen integer input", lambda tmp: frozen()(torch.randint(0, 2, (2, 16))), ValueError,
     r"^input must be a floating point tensor of dtype torch.float32 \(the dtype of FrozenGBLRLinear"),
    ("frozen float64 input", lambda tmp: frozen()(torch.randn(2, 16, dtype=torch.float64)), ValueError,
     r"^input has dtype torch.float64 but FrozenGBLRLinear\(in_features=16, out_features=8\) has dtype"),
    ("frozen input of wrong width", lambda tmp: frozen()(torch.randn(2, 8)), ValueError,
     r"^input must have in_features=16"),
    ("frozen state of other supports", lambda tmp: frozen().load_state_dict(moved_frozen_state()), RuntimeError,
     r"FrozenGBLRLinear\(in_features=16, out_features=8\).*block \d+ differs: the state dict has Support"),
    ("frozen supports of wrong shape",
     lambda tmp: frozen().load_state_dict({**frozen().state_dict(), "block_supports": torch.zeros(3)}),
     RuntimeError, r"block_supports must be an integer tensor of shape \(blocks, 4\), got \(3,\)"),
    ("frozen path_for(-1)", lambda tmp: frozen().path_for(-1), ValueError, r"^tokens must be a non-negative int"),
    # gaudi_mask
    ("mask width not a tensor", lambda tmp: gblr.gaudi_mask([0.5], torch.tensor([0.0]), 8), TypeError,
     r"^width and location must be tensors"),
    ("mask width 2-D", lambda tmp: gblr.gaudi_mask(torch.rand(2, 2), torch.rand(2, 2), 8), ValueError,
     r"^width must have shape \(K,\)"),
    ("mask location of other shape", lambda tmp: gblr.gaudi_mask(torch.rand(3), torch.rand(2), 8), ValueError,
     r"^location must have the same shape as width"),
    ("mask integer width", lambda tmp: gblr.gaudi_mask(torch.ones(2, dtype=torch.long), torch.zeros(2), 8),
     ValueError, r"^width and location must be floating point"),
    ("mask n=0", lambda tmp: gblr.gaudi_mask(torch.rand(2), torch.rand(2), 0), ValueError, r"^n \(the mask length\)"),
    ("mask n float", lambda tmp: gblr.gaudi_mask(torch.rand(2), torch.rand(2), 8.0), ValueError, r"^n \(the mask"),
    ("mask sigma=0", lambda tmp: gblr.gaudi_mask(torch.rand(2), torch.rand(2), 8, sigma=0), ValueError, r"^sigma"),
    ("mask nan width", lambda tmp: gblr.gaudi_mask(torch.tensor([NAN]), torch.tensor([0.0]), 8), ValueError,
     r"^width contains NaN or infinite values"),
    ("mask inf location", lambda tmp: gblr.gaudi_mask(torch.tensor([0.5]), torch.tensor([INF]), 8), ValueError,
     r"^location contains NaN or infinite values"),
    # GBLRConfig
    ("config flops_ratio=0", lambda tmp: gblr.GBLRConfig(flops_ratio=0), ValueError, r"^flops_ratio must be"),
    ("config flops_ratio nan", lambda tmp: gblr.GBLRConfig(flops_ratio=NAN), ValueError, r"^flops_ratio must be"),
    ("config flops_ratio bool", lambda tmp: gblr.GBLRConfig(flops_ratio=True), ValueError, r"^flops_ratio must be"),
    ("config target_modules bad regex", lambda tmp: gblr.GBLRConfig(target_modules="("), ValueError,
     r"^target_modules must be a valid regular expression"),
    ("config target_modules empty list", lambda tmp: gblr.GBLRConfig(target_modules=[]), ValueError,
     r"^target_modules must be"),
    ("config exclude everything", lambda tmp: gblr.GBLRConfig(exclude_modules="all-linear"), ValueError,
     r"^exclude_modules='all-linear' would exclude every target"),
    ("config override ratio 2", lambda tmp: gblr.GBLRConfig(overrides={"fc": 2}), ValueError,
     r"^overrides\['fc'\] must be a number in \(0, 1\]"),
    ("config overrides not a dict", lambda tmp: gblr.GBLRConfig(overrides=[("fc", 0.5)]), ValueError,
     r"^overrides must be a dict"),
    ("config allocation", lambda tmp: gblr.GBLRConfig(allocation="greedy"), ValueError, r"^allocation must be one of"),
    ("config method", lambda tmp: gblr.GBLRConfig(method="qr"), ValueError, r"^method must be one of"),
    ("config min_layer_ratio above", lambda tmp: gblr.GBLRConfig(flops_ratio=0.5, min_layer_ratio=0.9), ValueError,
     r"^min_layer_ratio must be"),
    ("config decompose_options reserved", lambda tmp: gblr.GBLRConfig(decompose_options={"bias": None}), ValueError,
     r"^decompose_options must not set \['bias'\]"),
    ("config decompose_options with svd", lambda tmp: gblr.GBLRConfig(method="svd", decompose_options={"trade": 1}),
     ValueError, r"^decompose_options are for method='gblr'"),
    ("config filter_fn", lambda tmp: gblr.GBLRConfig(filter_fn=3), ValueError, r"^filter_fn must be None or a callable"),
    # convert_
    ("convert_ model not a module", lambda tmp: gblr.convert_("model"), TypeError, r"^model must be an nn.Module"),
    ("convert_ config a dict", lambda tmp: convert({"flops_ratio": 0.5}), TypeError, r"^config must be a gblr"),
    ("convert_ calibration a tensor", lambda tmp: convert(None, torch.randn(3, 16)), TypeError,
     r"^calibration must be an iterable of batches"),
    ("convert_ calibration empty", lambda tmp: convert(None, []), ValueError, r"^calibration yielded no batches"),
    ("convert_ nan in calibration", lambda tmp: convert(None, nan_batches()), ValueError,
     r"^calibration batch 1 \(counting from 0\): the inputs of layer '0': activations contain NaN"),
    ("convert_ of a bare linear", lambda tmp: convert(None, None, nn.Linear(8, 8)), ValueError,
     r"the model itself is a linear layer"),
    ("convert_ of nothing to convert", lambda tmp: convert(gblr.GBLRConfig(target_modules=["nothing"])), ValueError,
     r"target_modules"),
    # decompose, svd_decompose, relative_error, InputStats
    ("decompose 1-D weight", lambda tmp: gblr.decompose(torch.randn(8), 0.5), ValueError,
     r"^weight must be a 2-D floating point tensor"),
    ("decompose integer weight", lambda tmp: gblr.decompose(torch.ones(4, 4, dtype=torch.long), 0.5), ValueError,
     r"^weight must be a 2-D floating point tensor"),
    ("decompose empty weight", lambda tmp: gblr.decompose(torch.zeros(0, 4), 0.5), ValueError,
     r"^weight must not be empty"),
    ("decompose nan weight", lambda tmp: gblr.decompose(nan_weight(), 0.5), ValueError,
     r"^weight contains NaN or infinite values"),
    ("decompose flops_ratio=0", lambda tmp: gblr.decompose(weight(8, 8), 0), ValueError, r"^flops_ratio must be"),
    ("decompose trade<0", lambda tmp: gblr.decompose(weight(8, 8), 0.5, trade=-1), ValueError, r"^trade must be"),
    ("decompose rounds=0", lambda tmp: gblr.decompose(weight(8, 8), 0.5, rounds=0), ValueError, r"^rounds must be"),
    ("decompose calibration a string", lambda tmp: gblr.decompose(weight(8, 8), 0.5, calibration="x"), TypeError,
     r"^calibration must be None, activations"),
    ("decompose calibration of other width", lambda tmp: gblr.decompose(weight(8, 8), 0.5,
                                                                        calibration=gblr.InputStats(4)),
     ValueError, r"^calibration has 4 features, the weight has 8 inputs"),
    ("decompose nan activations", lambda tmp: gblr.decompose(weight(8, 8), 0.5, calibration=torch.full((2, 8), NAN)),
     ValueError, r"^activations contain NaN or infinite values"),
    ("svd_decompose ratio below rank 1", lambda tmp: gblr.svd_decompose(weight(8, 8), 0.01), ValueError,
     r"^flops_ratio=0.01 buys no full rank-1 component"),
    ("svd_decompose flops_ratio=2", lambda tmp: gblr.svd_decompose(weight(8, 8), 2), ValueError,
     r"^flops_ratio must be"),
    ("svd_decompose weight a list", lambda tmp: gblr.svd_decompose([[1.0]], 0.5), ValueError, r"^weight must be"),
    ("relative_error nan weight", lambda tmp: gblr.relative_error(nan_weight(), weight(8, 8)), ValueError,
     r"^weight contains NaN"),
    ("InputStats non-square moment", lambda tmp: gblr.InputStats.from_second_moment(torch.ones(2, 3)), ValueError,
     r"^a second-moment matrix must be square"),
    ("InputStats without activations", lambda tmp: gblr.InputStats(4).second_moment, ValueError,
     r"^InputStats has seen no activations"),
    ("InputStats activations of other width", lambda tmp: gblr.InputStats(4).update(torch.randn(2, 5)), ValueError,
     r"^activations must have 4 features"),
    # save_pretrained / load_pretrained
    ("save_pretrained model not a module", lambda tmp: gblr.save_pretrained("model", tmp), TypeError,
     r"^model must be an nn.Module"),
    ("save_pretrained without GBLR layers", lambda tmp: saved(tmp, dense_model()), ValueError,
     r"^the model has no GBLRLinear or FrozenGBLRLinear layer"),
    ("load_pretrained base_model not a module", lambda tmp: gblr.load_pretrained("model", saved(tmp)), TypeError,
     r"^base_model must be an nn.Module"),
    ("load_pretrained missing folder", lambda tmp: load(tmp / "missing"), FileNotFoundError,
     r"gblr_config.json not found: is .*missing a directory written by gblr.save_pretrained"),
    ("load_pretrained invalid JSON", lambda tmp: load(broken_json(tmp)), ValueError,
     r"gblr_config.json is not valid JSON"),
    ("load_pretrained other format", lambda tmp: load(edited_config(tmp, lambda d: d.update(format="x"))),
     ValueError, r"gblr_config.json is not a gblr layers file"),
    ("load_pretrained format_version", lambda tmp: load(edited_config(tmp, lambda d: d.update(format_version=99))),
     ValueError, r"gblr_config.json has format_version 99"),
    ("load_pretrained layers not a list", lambda tmp: load(edited_config(tmp, lambda d: d.update(layers={}))),
     ValueError, r"'layers' must be a list"),
    ("load_pretrained layer without name", lambda tmp: load(edited_config(tmp, set_entry("name", 3))), ValueError,
     r"every layer needs a 'name' string"),
    ("load_pretrained unknown dtype", lambda tmp: load(edited_config(tmp, set_entry("dtype", "int64"))), ValueError,
     r"layer '0' in gblr_config.json: dtype must name a float torch dtype, got 'int64'"),
    ("load_pretrained unknown class", lambda tmp: load(edited_config(tmp, set_entry("class", "Linear"))), ValueError,
     r"layer '0' in gblr_config.json: class must be one of GBLRLinear, FrozenGBLRLinear, GBLRConv2d"),
    ("load_pretrained missing in_features", lambda tmp: load(edited_config(tmp, lambda d: d["layers"][0].pop(
        "in_features"))), ValueError, r"layer '0': saved with \(in_features, out_features\) = \(None, 24\)"),
    ("load_pretrained bad sigma", lambda tmp: load(edited_config(tmp, set_entry("sigma", -1))), ValueError,
     r"^sigma must be None"),
    ("load_pretrained rank above min", lambda tmp: load(edited_config(tmp, set_entry("rank", 100))), ValueError,
     r"^rank must be at most min\(in_features, out_features\)"),
    ("load_pretrained components changed", lambda tmp: load(edited_config(tmp, set_entry("components", 2))),
     ValueError, r"layer '0': tensor '0.in_width' has shape \(4,\) in .* the layer described in gblr_config.json needs \(2,\)"),
    ("load_pretrained frozen block width not an int", lambda tmp: load(frozen_folder(tmp, set_block("in_width", 1.5))),
     ValueError, r"layer '0' in gblr_config.json: missing or malformed 'in_width'"),
    ("load_pretrained frozen block moved", lambda tmp: load(frozen_folder(tmp, set_block("in_width", 3))),
     ValueError, r"layer '0': tensor '0.(left|right)0' has shape .* the layer described in gblr_config.json needs"),
    ("load_pretrained model of another shape", lambda tmp: load(saved(tmp), nn.Sequential(nn.Linear(16, 20))),
     ValueError, r"layer '0': saved with \(in_features, out_features\) = \(16, 24\)"),
    ("load_pretrained module missing", lambda tmp: load(saved(tmp), nn.Sequential(nn.Linear(16, 24))), ValueError,
     r"layer '2' saved in .* has no module of that name"),
    ("load_pretrained truncated tensors", lambda tmp: load(truncated(tmp)), ValueError,
     r"gblr_layers.safetensors is not a readable safetensors file"),
    ("load_pretrained nan width in the file",
     lambda tmp: load(edited_tensors(tmp, lambda t: t["2.in_width"].fill_(NAN))), ValueError,
     (r"layer '2' \(GBLRLinear\(in_features=24, out_features=8\)\): in_width contain NaN or infinite values as "
      r"loaded from .*gblr_layers.safetensors")),
    ("load_pretrained tensor of other dtype",
     lambda tmp: load(edited_tensors(tmp, lambda t: t.update({"0.u": t["0.u"].half()}))), ValueError,
     r"layer '0': tensor '0.u' has dtype torch.float16 in .* needs torch.float32"),
    ("load_pretrained tensor missing", lambda tmp: load(edited_tensors(tmp, lambda t: t.pop("0.v"))), ValueError,
     r"layer '0': tensor '0.v' missing from"),
    ("load_pretrained extra tensor", lambda tmp: load(edited_tensors(tmp, lambda t: t.update(extra=torch.ones(1)))),
     ValueError, r"holds tensors gblr_config.json does not describe: \['extra'\]"),
    # param_groups / StructureLearner
    ("param_groups lr=inf", lambda tmp: gblr.param_groups(gblr_model(), lr=INF), ValueError,
     r"^lr must be a finite number > 0"),
    ("param_groups lr=0", lambda tmp: gblr.param_groups(gblr_model(), lr=0.0), ValueError,
     r"^lr must be a finite number > 0"),
    ("param_groups struct_lr nan", lambda tmp: gblr.param_groups(gblr_model(), lr=1e-3, struct_lr=NAN), ValueError,
     r"^struct_lr must be a finite number >= 0"),
    ("param_groups weight_decay<0", lambda tmp: gblr.param_groups(gblr_model(), lr=1e-3, weight_decay=-1),
     ValueError, r"^weight_decay must be a finite number >= 0"),
    ("param_groups struct_betas", lambda tmp: gblr.param_groups(gblr_model(), lr=1e-3, struct_betas=(1.5, 0.9)),
     ValueError, r"^struct_betas must be two numbers in \[0, 1\)"),
    ("learner flops_target=0", lambda tmp: learner(flops_target=0), ValueError, r"^flops_target must be"),
    ("learner total_steps=0", lambda tmp: learner(total_steps=0), ValueError, r"^total_steps must be"),
    ("learner structure_fraction=2", lambda tmp: learner(structure_fraction=2), ValueError,
     r"^structure_fraction must be"),
    ("learner budget_warmup<0", lambda tmp: learner(budget_warmup=-0.5), ValueError, r"^budget_warmup must be"),
    ("learner without GBLR layers", lambda tmp: learner(dense_model(), torch.optim.SGD(dense_model().parameters(),
                                                                                       lr=0.1)),
     ValueError, r"^model has no GBLRLinear layers"),
    ("learner optimizer without structure", lambda tmp: learner(optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1)),
     ValueError, r"optimizer does not hold 8 structural parameters .* gblr.param_groups"),
    ("learner structure without gradients",
     lambda tmp: learner(frozen_structure_model(), torch.optim.SGD([torch.zeros(1)], lr=0.1)), ValueError,
     r"layer\(s\) \('0', '2'\) have requires_grad=False"),
    ("learner nan structure", lambda tmp: learner(nn.Sequential(with_value("in_width", 0, NAN))), ValueError,
     r"layer '0' \(GBLRLinear\(in_features=16, out_features=8\)\): in_width contain NaN .* before the first step"),
    # distill
    ("distill steps=0", lambda tmp: distill(steps=0), ValueError, r"^steps must be a positive int"),
    ("distill lr<0", lambda tmp: distill(lr=-1.0), ValueError, r"^lr must be a positive number"),
    ("distill lr=inf", lambda tmp: distill(lr=INF), ValueError, r"^lr must be a finite number > 0"),
    ("distill struct_lr=inf", lambda tmp: distill(struct_lr=INF), ValueError, r"^struct_lr must be a finite number"),
    ("distill max_seconds=0", lambda tmp: distill(max_seconds=0), ValueError, r"^max_seconds must be"),
    ("distill max_grad_norm nan", lambda tmp: distill(max_grad_norm=NAN), ValueError,
     r"^max_grad_norm must be a finite number > 0"),
    ("distill loss unknown", lambda tmp: distill(loss="kld"), ValueError, r"^loss must be one of"),
    ("distill no batches", lambda tmp: distill(batches=[]), ValueError, r"^batches is empty"),
    ("distill student is teacher", lambda tmp: distill_into_itself(), ValueError,
     r"^student and teacher are the same module"),
    # flops_report
    ("flops_report model not a module", lambda tmp: gblr.flops_report("model"), TypeError,
     r"^model must be an nn.Module"),
    ("flops_report include_dense not a bool", lambda tmp: gblr.flops_report(gblr_model(), include_dense="yes"),
     TypeError, r"^include_dense must be a bool"),
    ("flops_report ratio without structured layers", lambda tmp: empty_report_ratio(), ValueError,
     r"^the model has no structured layers"),
    # explain
    ("explain model not a module", lambda tmp: gblr.explain("model"), TypeError, r"^model must be an nn.Module"),
    ("explain tokens empty", lambda tmp: gblr.explain(gblr_model(), tokens=()), ValueError, r"^tokens must be"),
    ("explain tokens zero", lambda tmp: gblr.explain(gblr_model(), tokens=(0,)), ValueError, r"^tokens must be"),
    ("explain tokens a string", lambda tmp: gblr.explain(gblr_model(), tokens="16"), ValueError, r"^tokens must be"),
    ("explain tokens an int", lambda tmp: gblr.explain(gblr_model(), tokens=16), ValueError, r"^tokens must be"),
    ("explain without GBLR layers", lambda tmp: gblr.explain(dense_model()), ValueError,
     r"^model has no GBLR layers"),
    # structures
    ("low_rank p 1-D", lambda tmp: gblr.structures.low_rank(torch.randn(4), torch.randn(1, 4)), ValueError,
     r"^p must be a 2-D floating point tensor"),
    ("low_rank ranks differ", lambda tmp: gblr.structures.low_rank(torch.randn(4, 3), torch.randn(2, 4)),
     ValueError, r"^p has 3 columns but q has 2 rows"),
    ("low_rank nan q", lambda tmp: gblr.structures.low_rank(torch.randn(4, 1), torch.full((1, 4), NAN)),
     ValueError, r"^q contains NaN"),
    ("block_sparse block_shape not dividing", lambda tmp: gblr.structures.block_sparse(weight(8, 8), (3, 3)),
     ValueError, r"^block_shape=\(3, 3\) must divide the weight's shape"),
    ("block_sparse block_shape zero", lambda tmp: gblr.structures.block_sparse(weight(8, 8), (0, 2)), ValueError,
     r"^block_shape must be a pair of positive ints"),
    ("block_sparse offset", lambda tmp: gblr.structures.block_sparse(weight(8, 8), (2, 2), offset="0"), ValueError,
     r"^offset must be a pair of ints"),
    ("block_sparse integer weight", lambda tmp: gblr.structures.block_sparse(torch.ones(4, 4, dtype=torch.long),
                                                                            (2, 2)),
     ValueError, r"^weight must be a 2-D floating point tensor"),
    ("block_low_rank grid not dividing", lambda tmp: gblr.structures.block_low_rank(weight(8, 8), (3, 1), 1),
     ValueError, r"^grid=\(3, 1\) must divide"),
    ("block_low_rank rank=0", lambda tmp: gblr.structures.block_low_rank(weight(8, 8), (2, 2), 0), ValueError,
     r"^rank must be an int in \[1, 4\]"),
    ("block_low_rank rank too high", lambda tmp: gblr.structures.block_low_rank(weight(8, 8), (2, 2), 5), ValueError,
     r"^rank must be an int in \[1, 4\]"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_a_message_naming_it(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_the_table_has_one_row_per_id():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
