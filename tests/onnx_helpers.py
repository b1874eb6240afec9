"""Tiny ONNX graphs with the real models' input/output names, shapes and layouts.

The real files (inswapper_128, w600k_r50, SCRFD, ...) cannot be downloaded here, so the
adapters are tested on stand-ins: graphs whose signature matches and whose arithmetic is
simple enough to compute independently in numpy (a constant output, an identity, a
matrix product). Built with the ``onnx`` helper API.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Shape = Sequence[int | str | None]
OPSET = 17


def value_info(name: str, shape: Shape, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def save_model(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: dict[str, Shape],
    outputs: dict[str, Shape],
    initializers: dict[str, np.ndarray] | None = None,
    name: str = "stand-in",
) -> Path:
    """Write a checked ONNX model. ``initializers`` keep their order: some adapters read a
    model's last initializer (inswapper's embedding map)."""
    graph = helper.make_graph(
        nodes,
        name,
        [value_info(n, s) for n, s in inputs.items()],
        [value_info(n, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def constant_model(
    path: Path,
    inputs: dict[str, Shape],
    outputs: dict[str, np.ndarray],
    name: str = "stand-in",
    symbolic_outputs: bool = False,
) -> Path:
    """A model that ignores its inputs and returns fixed arrays: for checking how an
    adapter decodes known raw outputs (anchors, strides, boxes). ``symbolic_outputs``: the
    graph declares every output size by name only (``score_0_d1``...), as some exports do."""
    nodes = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a.astype(np.float32)))
        for n, a in outputs.items()
    ]
    shapes: dict[str, Shape] = {
        n: [f"{n}_d{i}" for i in range(a.ndim)] if symbolic_outputs else list(a.shape)
        for n, a in outputs.items()
    }
    return save_model(path, nodes, inputs, shapes, name=name)


def identity_model(path: Path, name_in: str, name_out: str, shape: Shape) -> Path:
    """Output = input: for checking an adapter's pre- and post-processing round trip."""
    node = helper.make_node("Identity", [name_in], [name_out])
    return save_model(path, [node], {name_in: shape}, {name_out: shape})


def scaled_by_input_model(
    path: Path,
    name_in: str,
    weight_name: str,
    name_out: str,
    shape: Shape,
    weight_dtype: int = TensorProto.DOUBLE,
    weight_shape: Shape = (1,),
) -> Path:
    """Output = input x weight, the weight a second (scalar) input of its own type: a
    CodeFormer-like stand-in, to check what an adapter feeds as the weight."""
    nodes = [
        helper.make_node("Cast", [weight_name], ["weight_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [name_in, "weight_f32"], [name_out]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled-by-input",
        [value_info(name_in, shape), value_info(weight_name, weight_shape, weight_dtype)],
        [value_info(name_out, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def arcface_model(
    path: Path,
    weight: np.ndarray,
    bias: np.ndarray,
    pool: int = 8,
    input_name: str = "input.1",
    output_name: str = "683",
    size: int = 112,
    normalises_inside: bool = False,
) -> Path:
    """An ArcFace stand-in ([N,3,size,size] -> [N,D]): ``pool`` x ``pool`` average pooling,
    flattened (channel, row, column), times ``weight`` ((3 * (size/pool)^2, D)) plus ``bias``.
    Cheap, yet every pixel's channel, place and scale reach the output, so a test can
    compute the expected embedding in numpy. ``normalises_inside``: the graph takes raw
    0..255 RGB and scales it itself first, (x - 127.5) * (1 / 127.5), in nodes named as
    MXNet-converted exports name them (``_minus0``, ``_mul0``)."""
    first = input_name
    nodes = []
    extra: dict[str, np.ndarray] = {}
    if normalises_inside:
        nodes += [
            helper.make_node("Sub", [input_name, "centre"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"),
        ]
        extra = {"centre": np.float32(127.5), "scale": np.float32(1 / 127.5)}
        first = "scaled"
    nodes += [
        helper.make_node("AveragePool", [first], ["pooled"], kernel_shape=[pool, pool],
                         strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], [output_name]),
    ]  # fmt: skip
    return save_model(
        path,
        nodes,
        {input_name: ["N", 3, size, size]},
        {output_name: ["N", weight.shape[1]]},
        {**extra, "weight": weight.astype(np.float32), "bias": bias.astype(np.float32)},
        name="arcface-stand-in",
    )


def inswapper_model(
    path: Path,
    emap: np.ndarray,
    flat_colour: Sequence[float] | None = None,
    expected_latent: np.ndarray | None = None,
    gain: float = 10.0,
    leading: dict[str, np.ndarray] | None = None,
    size: int = 128,
) -> Path:
    """An inswapper_128 stand-in: "target" [1,3,size,size] and "source" [1,512] in, "output"
    [1,3,size,size] out, ``emap`` the LAST initializer (``leading`` ones go first).

    The output is the target itself (identity), or ``flat_colour`` (RGB 0..1) everywhere,
    plus ``gain`` * sum(|source - expected_latent|) times a +-1 checkerboard: with the
    latent the adapter should feed, the output is the body alone; with any other, a
    high-contrast pattern that no colour matching can take out (a gate a test can read
    through the whole swap). Without ``expected_latent`` the source is used times zero."""
    latent = emap.shape[1]
    expected = np.zeros((1, latent)) if expected_latent is None else expected_latent
    gate = gain if expected_latent is not None else 0.0
    colour = np.zeros(3) if flat_colour is None else np.asarray(flat_colour)
    keep = 1.0 if flat_colour is None else 0.0
    ys, xs = np.mgrid[:size, :size]
    checkerboard = np.where((ys // 4 + xs // 4) % 2 == 0, 1.0, -1.0)
    nodes = [
        helper.make_node("Mul", ["target", "keep"], ["kept"]),
        helper.make_node("Add", ["kept", "colour"], ["body"]),
        helper.make_node("Sub", ["source", "expected"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["abs_diff"]),
        helper.make_node("ReduceSum", ["abs_diff"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "gain"], ["amount"]),
        helper.make_node("Mul", ["amount", "pattern"], ["gated"]),
        helper.make_node("Add", ["body", "gated"], ["output"]),
    ]
    initializers = dict(leading or {})
    initializers |= {
        "keep": np.array(keep, np.float32),
        "colour": colour.astype(np.float32).reshape(1, 3, 1, 1),
        "expected": np.asarray(expected, np.float32).reshape(1, latent),
        "gain": np.array(gate, np.float32),
        "pattern": checkerboard.astype(np.float32)[None, None],
        "emap": emap.astype(np.float32),
    }
    return save_model(
        path,
        nodes,
        {"target": [1, 3, size, size], "source": [1, latent]},
        {"output": [1, 3, size, size]},
        initializers,
        name="inswapper-stand-in",
    )


def swapper_model(
    path: Path,
    size: int,
    source_shape: Shape,
    keep: Sequence[float],
    offset: Sequence[float],
    expected_source: np.ndarray | None = None,
    tolerance: float = 1e-3,
    gain: float = 1000.0,
    mask_output: bool = False,
) -> Path:
    """A learned swapper stand-in with the real names: "target" [1,3,size,size] and
    "source" (``source_shape``) in, "output" [1,3,size,size] out (and a "mask" [1,1,S,S]
    second output, as some exports have, with ``mask_output``).

    The output is ``target * keep + offset`` per channel (the test picks them so that the
    family's documented scaling brings the crop back, or paints a flat colour), plus ``gain``
    x max(|source - expected_source| - ``tolerance``, 0) times a +-1 checkerboard: with the
    source input the family should get, the body alone; with any other, a high-contrast
    pattern through the whole swap. Without ``expected_source`` the source is unused."""
    ys, xs = np.mgrid[:size, :size]
    checkerboard = np.where((ys // 4 + xs // 4) % 2 == 0, 1.0, -1.0)
    expected = (
        np.zeros([d if isinstance(d, int) else 1 for d in source_shape])
        if expected_source is None
        else expected_source
    )
    nodes = [
        helper.make_node("Mul", ["target", "keep"], ["kept"]),
        helper.make_node("Add", ["kept", "offset"], ["body"]),
        helper.make_node("Sub", ["source", "expected"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["abs_diff"]),
        helper.make_node("ReduceMax", ["abs_diff"], ["worst"], keepdims=0),
        helper.make_node("Sub", ["worst", "tolerance"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["over"]),
        helper.make_node("Mul", ["over", "gain"], ["amount"]),
        helper.make_node("Mul", ["amount", "pattern"], ["gated"]),
        helper.make_node("Add", ["body", "gated"], ["output"]),
    ]
    outputs: dict[str, Shape] = {"output": [1, 3, size, size]}
    if mask_output:
        nodes.append(helper.make_node("ReduceMean", ["body"], ["mask"], axes=[1], keepdims=1))
        outputs["mask"] = [1, 1, size, size]
    initializers = {
        "keep": np.asarray(keep, np.float32).reshape(1, 3, 1, 1),
        "offset": np.asarray(offset, np.float32).reshape(1, 3, 1, 1),
        "expected": np.asarray(expected, np.float32),
        "tolerance": np.array(tolerance, np.float32),
        "gain": np.array(gain if expected_source is not None else 0.0, np.float32),
        "pattern": checkerboard.astype(np.float32)[None, None],
    }
    return save_model(
        path,
        nodes,
        {"target": [1, 3, size, size], "source": list(source_shape)},
        outputs,
        initializers,
        name="swapper-stand-in",
    )


def converter_model(path: Path, weight: np.ndarray, bias: np.ndarray) -> Path:
    """An embedding converter stand-in (crossface_*): "input" [1,512] -> "output" [1,512],
    ``input @ weight + bias`` (the bias makes a unit-length input give another direction
    than the raw one, so a test can tell which it was fed)."""
    nodes = [
        helper.make_node("MatMul", ["input", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["output"]),
    ]
    return save_model(
        path,
        nodes,
        {"input": [1, weight.shape[0]]},
        {"output": [1, weight.shape[1]]},
        {"weight": weight.astype(np.float32), "bias": bias.astype(np.float32)},
        name="converter-stand-in",
    )
