"""The kernels of a compiled XLA program, read from its optimized HLO text.

Each top-level instruction of the ENTRY computation that does work (a fusion, a cuDNN or
cuBLAS custom call, a copy, a convolution, ...) is one kernel. Its modeled HBM traffic is
the bytes of its operands plus the bytes of its results: every kernel reads its inputs from
device memory and writes its outputs back, which is what separate kernels must do.

What the model leaves out:

- L2 hits. An H100's 50 MB L2 holds less than one ResNet-18 stage-1 activation at batch
  512, but the smaller later-stage tensors may partly hit it, so the traffic of those
  kernels is an upper bound.
- Partial reads, except for a fusion parameter that is only sliced: that costs the slices.
- Control flow. A ``call``, ``while`` or ``conditional`` is counted as one kernel with its
  own operands and results; its body is not expanded. The GPU programs here have none; the
  CPU program's few are its random-number loops.

FLOPs are counted for convolutions (XLA ``convolution`` and cuDNN convolution custom calls,
forward and both backward passes), ``dot``s and cuBLAS GEMMs, also inside fusions.
Element-wise and reduction arithmetic is memory-bound and left at 0.

Malformed input raises ``ValueError``: an unknown element type, an unparsed instruction
line or an undefined operand. Nothing is silently counted as 0 bytes.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_ELEMENT_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "f4e2m1fn": 4, "s8": 8, "u8": 8,
    "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e3m4": 8, "f8e4m3b11fnuz": 8,
    "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8,
    "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
    "f32": 32, "s32": 32, "u32": 32,
    "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
# Instructions that launch nothing: they name, alias or group buffers.
_NO_KERNEL = frozenset(
    {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
     "opt-barrier", "partition-id", "replica-id"}
)
# Ops a fusion parameter may pass through on its way to a slice without being read whole.
_PASS_THROUGH = frozenset({"convert", "bitcast", "reshape"})
_SLICES = frozenset({"slice", "dynamic-slice"})


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


@dataclass(frozen=True)
class _Instruction:
    name: str
    result: str  # the result type, e.g. "bf16[8,32,32,64]{3,2,1,0}" or a tuple of them
    op: str
    operands: tuple[str, ...]
    line: str


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``dtype[d0,d1,...]`` array type in ``text`` (a tuple type gives several)."""
    shapes = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _ELEMENT_BITS:
            raise ValueError(f"unknown element type {dtype!r} in HLO type {text!r}")
        shapes.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return shapes


def shape_bytes(text: str) -> int:
    """Bytes of the arrays of an HLO type (a tuple type: all its arrays)."""
    bits = sum(_ELEMENT_BITS[t] * math.prod(dims) for t, dims in array_shapes(text))
    return (bits + 7) // 8


def _parse(lines: list[str], where: str) -> list[_Instruction]:
    instructions = []
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith(("%", "ROOT ")):
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            raise ValueError(f"cannot parse this instruction of {where}: {stripped[:200]!r}")
        name, result, op, rest = m.groups()
        # The operand list ends at the first ")" that closes it; attributes follow.
        operands = tuple(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]))
        instructions.append(_Instruction(name, result, op, operands, line))
    return instructions


def _computations(text: str) -> dict[str, list[_Instruction]]:
    """Instructions of each computation, by name; the entry one is ``"ENTRY"``."""
    raw: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if head:
            current = "ENTRY" if head.group(1) else head.group(2)
            raw[current] = []
        elif current is not None and line.startswith(" "):
            raw[current].append(line)
    if "ENTRY" not in raw:
        raise ValueError("no 'ENTRY %name' computation in this HLO text")
    return {name: _parse(lines, name) for name, lines in raw.items()}


def _first_array(text: str) -> tuple[int, ...]:
    shapes = array_shapes(text)
    if not shapes:
        raise ValueError(f"no array in HLO type {text!r}")
    return shapes[0][1]


def _conv_flops(ins: _Instruction, role: str, types: dict[str, str]) -> int:
    """2 x (forward output elements) x (window elements) x (input features per group).

    ``role`` says where the forward convolution's output and kernel are: a forward conv
    returns its output and takes the kernel as operand 1; a filter gradient takes the
    forward output's gradient as operand 1 and returns the kernel; a data gradient takes
    the output gradient as operand 0 and the kernel as operand 1. ``dim_labels`` and
    ``window`` describe the forward convolution in all three.
    """
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.line)
    if labels is None or len(ins.operands) < 2:
        raise ValueError(f"convolution without dim_labels or operands: {ins.line[:200]!r}")
    result = types[ins.name]
    if role == "forward":
        out, kernel = result, types[ins.operands[1]]
    elif role == "backward_filter":
        out, kernel = types[ins.operands[1]], result
    else:
        out, kernel = types[ins.operands[0]], types[ins.operands[1]]
    out_dims, kernel_dims = _first_array(out), _first_array(kernel)
    in_features = kernel_dims[labels.group(2).index("i")]
    window = re.search(r"window=\{size=([\dx]+)", ins.line)
    window_elems = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    # An XLA data gradient of a strided conv dilates its input with zeros: skip those taps
    # (exact when each input size is the stride times the output size, as in ResNets).
    dilation = re.search(r"lhs_dilate=([\dx]+)", ins.line)
    skipped = math.prod(int(s) for s in dilation.group(1).split("x")) if dilation else 1
    return 2 * math.prod(out_dims) * window_elems * in_features // skipped


def _contracted(lhs_type: str, dims: Iterable[str]) -> int:
    lhs = _first_array(lhs_type)
    return math.prod(lhs[int(d)] for d in dims)


def _dot_flops(ins: _Instruction, types: dict[str, str]) -> int:
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.line)
    dims = contracting.group(1).split(",") if contracting else []
    k = _contracted(types[ins.operands[0]], [d for d in dims if d])
    return 2 * math.prod(_first_array(types[ins.name])) * k


def _gemm_flops(ins: _Instruction, types: dict[str, str]) -> int:
    """A cuBLAS custom call: its contraction is in the JSON backend_config."""
    config = re.search(r"backend_config=(\{.*\})\s*$", ins.line)
    if config is None:
        raise ValueError(f"cuBLAS call without backend_config: {ins.line[:200]!r}")
    gemm = json.loads(config.group(1)).get("gemm_backend_config", {})
    dims = gemm.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
    k = _contracted(types[ins.operands[0]], dims)
    return 2 * math.prod(_first_array(types[ins.name])) * k


def _without_workspace(result: str) -> str:
    """A library call's result less its trailing u8/s8 workspace (scratch, not traffic)."""
    if result.startswith("("):
        parts = re.split(r",\s*(?=(?:/\*index=\d+\*/)?[a-z][a-z0-9]*\[)", result[1:-1])
        if len(parts) > 1 and re.match(r"(?:/\*index=\d+\*/)?[su]8\[\d+\]", parts[-1].strip()):
            return "(" + ", ".join(parts[:-1]) + ")"
    return result


def _arithmetic_flops(body: list[_Instruction], comps: dict[str, list[_Instruction]],
                      types: dict[str, str]) -> int:
    """FLOPs of the convolutions, dots and GEMMs of ``body``, nested fusions included."""
    flops = 0
    for ins in body:
        types.setdefault(ins.name, ins.result)
        if ins.op == "convolution":
            flops += _conv_flops(ins, "forward", types)
        elif ins.op == "dot":
            flops += _dot_flops(ins, types)
        elif ins.op == "custom-call":
            flops += _custom_call_flops(ins, types)
        elif ins.op == "fusion":
            callee = re.search(r"calls=%([\w.\-]+)", ins.line)
            if callee:
                flops += _arithmetic_flops(comps.get(callee.group(1), []), comps, {})
    return flops


def _custom_call_target(ins: _Instruction) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', ins.line)
    return target.group(1) if target else "?"


def _custom_call_flops(ins: _Instruction, types: dict[str, str]) -> int:
    target = _custom_call_target(ins)
    if target.startswith("__cudnn$conv"):
        role = ("backward_input" if "BackwardInput" in target else
                "backward_filter" if "BackwardFilter" in target else "forward")
        return _conv_flops(ins, role, types)
    if target.startswith("__cublas$"):
        return _gemm_flops(ins, types)
    return 0


def _fusion_read_bytes(ins: _Instruction, body: list[_Instruction],
                       types: dict[str, str]) -> int:
    """Bytes a fusion reads: each operand whole, or only the slices taken of it."""
    users: dict[str, list[_Instruction]] = {}
    for b in body:
        for o in b.operands:
            users.setdefault(o, []).append(b)
    params = {}
    for b in body:
        if b.op == "parameter":
            params[int(re.search(r"parameter\((\d+)\)", b.line).group(1))] = b.name

    def sliced_elements(name: str) -> int | None:
        """Elements read through slices only, or None if ``name`` is read whole."""
        if not users.get(name):  # the fusion's output (or unused): read whole
            return None
        total = 0
        for u in users.get(name, []):
            if u.op in _SLICES and u.operands[0] == name:
                total += math.prod(_first_array(u.result))
            elif u.op in _PASS_THROUGH:
                inner = sliced_elements(u.name)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total

    read = 0
    for i, operand in enumerate(ins.operands):
        whole = shape_bytes(types[operand])
        sliced = sliced_elements(params[i]) if i in params else None
        if sliced is None:
            read += whole
        else:
            (dtype, _), = array_shapes(types[operand])
            read += min(whole, (sliced * _ELEMENT_BITS[dtype] + 7) // 8)
    return read


def parse_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of the ENTRY computation of an optimized HLO module, in program order."""
    comps = _computations(hlo_text)
    types: dict[str, str] = {}
    kernels = []
    for ins in comps["ENTRY"]:
        types[ins.name] = ins.result
        for o in ins.operands:
            if o not in types:
                raise ValueError(f"operand %{o} of %{ins.name} is not defined before it")
        if ins.op in _NO_KERNEL:
            continue
        read = sum(shape_bytes(types[o]) for o in ins.operands)
        write = shape_bytes(ins.result)
        flops = 0
        kind = ins.op
        if ins.op == "custom-call":
            target = _custom_call_target(ins)
            kind = target.rsplit("$", 1)[-1]
            if target.startswith(("__cudnn$", "__cublas$")):
                write = shape_bytes(_without_workspace(ins.result))
            flops = _custom_call_flops(ins, types)
        elif ins.op == "fusion":
            fusion_kind = re.search(r"kind=(k\w+)", ins.line)
            kind = f"fusion:{fusion_kind.group(1) if fusion_kind else '?'}"
            callee = re.search(r"calls=%([\w.\-]+)", ins.line)
            body = comps.get(callee.group(1), []) if callee else []
            if body:
                read = _fusion_read_bytes(ins, body, types)
            flops = _arithmetic_flops(body, comps, {})
        elif ins.op in ("convolution", "dot"):
            flops = _arithmetic_flops([ins], comps, types)
        kernels.append(Kernel(ins.name, kind, read, write, flops))
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


def roofline_time(kernels: Iterable[Kernel], peak_flops: float | None,
                  bandwidth: float | None, floor_s: float = 0.0) -> float | None:
    """The sum of the kernels' roofline times (they run one after another), or None
    without a bandwidth.

    With ``floor_s``, no kernel takes less than that: a launch, however small the kernel,
    occupies the GPU for a few microseconds (fill, drain and the gap to the next one).
    """
    if bandwidth is None:
        return None
    if floor_s < 0:
        raise ValueError(f"floor_s must be >= 0, got {floor_s}")
    return sum(max(kernel_time(k, peak_flops, bandwidth), floor_s) for k in kernels)


def by_size(kernels: Iterable[Kernel], peak_flops: float | None, bandwidth: float,
            edges_s: Sequence[float],
            measured_s: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Kernels binned by roofline time: ``[edges_s[i], edges_s[i+1])``, the last bin open.

    Each bin has its lower edge ``from_s`` (the upper is the next bin's), ``count`` and
    ``roofline_s`` (their sum); with ``measured_s`` (per kernel, in ``kernels``' order) also
    ``measured_s``, the sum of their measured times, and ``seen``, how many of them were
    measured at all (a positive time).
    """
    if not bandwidth:
        raise ValueError(f"binning by roofline time needs a bandwidth, got {bandwidth!r}")
    edges = list(edges_s)
    if not edges or edges[0] != 0 or edges != sorted(set(edges)):
        raise ValueError(f"edges_s must rise strictly from 0, got {edges}")
    kernels = list(kernels)
    if measured_s is not None and len(measured_s) != len(kernels):
        raise ValueError(f"{len(measured_s)} measured times for {len(kernels)} kernels")
    bins: list[dict[str, Any]] = [
        {"from_s": e, "count": 0, "roofline_s": 0.0,
         **({} if measured_s is None else {"measured_s": 0.0, "seen": 0})} for e in edges]
    for i, k in enumerate(kernels):
        t = kernel_time(k, peak_flops, bandwidth)
        b = bins[bisect.bisect_right(edges, t) - 1]
        b["count"] += 1
        b["roofline_s"] += t
        if measured_s is not None:
            b["measured_s"] += measured_s[i]
            b["seen"] += measured_s[i] > 0
    return bins


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
