"""The kernels of a compiled XLA program, read from its optimized HLO text.

Each top-level instruction of the ENTRY computation that does work (a fusion, a cuDNN or
cuBLAS custom call, a copy, a convolution, ...) is one kernel. Its modeled HBM traffic is
the bytes of its operands plus the bytes of its results: every kernel reads its inputs from
device memory and writes its outputs back, which is what separate kernels must do. L2 hits
are not modeled (an H100's 50 MB L2 holds less than one ResNet-18 stage-1 activation at
batch 512), nor partial reads other than a fusion whose root is a slice (it reads what it
returns). FLOPs are counted for convolutions (XLA ``convolution`` and cuDNN convolution
custom calls, forward and both backward passes) and top-level ``dot``s; elementwise and
reduction arithmetic is memory-bound and left at 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

_ELEMENT_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
# Instructions that launch nothing: they name, alias or group buffers.
_NO_KERNEL = frozenset(
    {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
     "opt-barrier", "partition-id", "replica-id"}
)
_CUDNN_CONV = {
    "__cudnn$convForward": "forward",
    "__cudnn$convBiasActivationForward": "forward",
    "__cudnn$convBackwardInput": "backward_input",
    "__cudnn$convBackwardFilter": "backward_filter",
}


@dataclass(frozen=True)
class Kernel:
    name: str
    kind: str  # e.g. "fusion:kLoop", "convForward", "copy"
    read_bytes: int
    write_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``dtype[d0,d1,...]`` array type in ``text`` (a tuple type gives several)."""
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY.findall(text)
    ]


def shape_bytes(text: str) -> int:
    return sum(_ELEMENT_BYTES[t] * math.prod(dims) for t, dims in array_shapes(text))


def _operand_names(args: str) -> list[str]:
    # The operand list ends at the first ")" that closes it; attributes follow.
    return re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])


def _computations(text: str) -> dict[str, list[str]]:
    """Instruction lines of each computation, by name; the entry one is ``"ENTRY"``."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if head and not line.startswith(" "):
            current = "ENTRY" if head.group(1) else head.group(2)
            comps[current] = []
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    return comps


def _root_opcode(lines: list[str]) -> str | None:
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m and line.lstrip().startswith("ROOT "):
            return m.group(3)
    return None


def _arithmetic_flops(lines: list[str], shapes: dict[str, str] | None = None) -> int:
    """FLOPs of the convolutions and dots among ``lines`` (one computation; ``shapes``: the
    result types of its instructions seen so far)."""
    shapes = {} if shapes is None else shapes
    flops = 0
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, result, op, rest = m.groups()
        shapes[name] = result
        if op == "convolution":
            flops += _conv_flops(line, "forward", _operand_names(rest), result, shapes)
        elif op == "dot":
            flops += _dot_flops(line, _operand_names(rest), result, shapes)
    return flops


def _conv_flops(line: str, role: str, operands: list[str], result: str,
                shapes: dict[str, str]) -> int:
    """2 x (forward output elements) x (window elements) x (input features per group).

    ``role`` says where the forward convolution's output and kernel are: a forward conv
    returns its output and takes the kernel as operand 1; a filter gradient takes the
    forward output's gradient as operand 1 and returns the kernel; a data gradient takes
    the output gradient as operand 0 and the kernel as operand 1.
    """
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    window = re.search(r"window=\{size=([\dx]+)", line)
    if labels is None or len(operands) < 2:
        return 0
    if role == "forward":
        out, kernel = result, shapes[operands[1]]
    elif role == "backward_filter":
        out, kernel = shapes[operands[1]], result
    else:
        out, kernel = shapes[operands[0]], shapes[operands[1]]
    (_, out_dims), (_, kernel_dims) = array_shapes(out)[0], array_shapes(kernel)[0]
    in_features = kernel_dims[labels.group(2).index("i")]
    window_elems = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    # An XLA data gradient of a strided conv dilates its input with zeros: skip those taps.
    dilation = re.search(r"lhs_dilate=([\dx]+)", line)
    skipped = math.prod(int(s) for s in dilation.group(1).split("x")) if dilation else 1
    return 2 * math.prod(out_dims) * window_elems * in_features // skipped


def _dot_flops(line: str, operands: list[str], result: str, shapes: dict[str, str]) -> int:
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if contracting is None or not operands:
        return 0
    (_, lhs), (_, out) = array_shapes(shapes[operands[0]])[0], array_shapes(result)[0]
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2 * math.prod(out) * k


def parse_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the ENTRY computation of an optimized HLO module, in program order."""
    if "\nENTRY" not in hlo_text and not hlo_text.startswith("ENTRY"):
        raise ValueError("no ENTRY computation in this HLO text")
    comps = _computations(hlo_text)
    shapes: dict[str, str] = {}
    kernels = []
    for line in comps["ENTRY"]:
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, result, op, rest = m.groups()
        shapes[name] = result
        if op in _NO_KERNEL:
            continue
        operands = _operand_names(rest)
        read = sum(shape_bytes(shapes.get(o, "")) for o in operands)
        write = shape_bytes(result)
        flops = 0
        kind = op
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            target_name = target.group(1) if target else "?"
            kind = target_name.rsplit("$", 1)[-1]
            if target_name in _CUDNN_CONV:
                # Results are (output, u8 workspace): the workspace is scratch, not traffic.
                conv_out = result.split("u8[", 1)[0]
                write = shape_bytes(conv_out)
                flops = _conv_flops(line, _CUDNN_CONV[target_name], operands, conv_out, shapes)
        elif op == "fusion":
            fusion_kind = re.search(r"kind=(k\w+)", line)
            kind = f"fusion:{fusion_kind.group(1) if fusion_kind else '?'}"
            callee = re.search(r"calls=%([\w.\-]+)", line)
            body = comps.get(callee.group(1), []) if callee else []
            if _root_opcode(body) == "slice":
                read = write
            flops = _arithmetic_flops(body)
        elif op in ("convolution", "dot"):
            flops = _arithmetic_flops([line], shapes)
        kernels.append(Kernel(name, kind, read, write, flops))
    return kernels


@dataclass(frozen=True)
class KindTotal:
    kind: str
    count: int
    read_bytes: int
    write_bytes: int
    flops: int
    roofline_s: float | None


def kernel_time(k: Kernel, peak_flops: float | None, bandwidth: float | None) -> float | None:
    """A kernel's roofline time: at least its FLOPs at peak and its bytes at full bandwidth."""
    if bandwidth is None:
        return None
    t = k.bytes / bandwidth
    if peak_flops:
        t = max(t, k.flops / peak_flops)
    return t


def by_kind(kernels: Iterable[Kernel], peak_flops: float | None,
            bandwidth: float | None) -> list[KindTotal]:
    """Totals per kernel kind, largest traffic first."""
    acc: dict[str, list] = {}
    for k in kernels:
        a = acc.setdefault(k.kind, [0, 0, 0, 0, 0.0])
        a[0] += 1
        a[1] += k.read_bytes
        a[2] += k.write_bytes
        a[3] += k.flops
        t = kernel_time(k, peak_flops, bandwidth)
        a[4] = None if t is None else a[4] + t
    rows = [KindTotal(kind, *vals) for kind, vals in acc.items()]
    return sorted(rows, key=lambda r: -(r.read_bytes + r.write_bytes))
