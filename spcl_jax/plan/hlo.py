"""What a compiled program does per run of it, read from its optimised HLO text: the collectives and their bytes,
and the bytes its kernels read and write (XLA's GPU backend gives no cost analysis; `counted_bytes` stands in).

The text is XLA's (`compiled.as_text()`): computations of instructions `%name = shape opcode(operands), attrs`.
A computation runs as often as its callers run it: once from the entry, `known_trip_count` times as a while
loop's body (once when XLA does not know the count), and never as a fusion's or a reduction's body, whose work
is counted at its caller.
"""
import collections
import dataclasses
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# Instructions that move no data of their own: views, bookkeeping, the ends of asynchronous pairs.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
               "replica-id", "opt-barrier", "add-dependency", "domain", "while", "call", "conditional"}
_ARRAY = re.compile(r"\b([a-z]\w*?)\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list
    attributes: str

    @property
    def bytes(self) -> int:
        return shape_bytes(self.shape)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (a tuple's elements summed; layouts and tiling padding not counted)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            total += count * DTYPE_BYTES[dtype]
    return int(total)


def _split_shape(text):
    """(shape, rest) of `shape opcode(...)...`: a shape is one token or a parenthesised tuple."""
    if text.startswith("("):
        depth = 0
        for i, c in enumerate(text):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return text[:i + 1], text[i + 1:].lstrip()
    shape, _, rest = text.partition(" ")
    return shape, rest


def _split_call(text):
    """(opcode, operand text, attributes) of `opcode(operands), attributes`."""
    opcode, _, rest = text.partition("(")
    depth = 1
    for i, c in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return opcode.strip(), rest[:i], rest[i + 1:]
    return opcode.strip(), rest, ""


def parse(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
    """({computation: [Instruction]}, entry computation name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        header = stripped.split("(")[0]
        if stripped.endswith("{") and header.startswith(("%", "ENTRY")) and " = " not in header:
            name = header.removeprefix("ENTRY").strip().lstrip("%")
            current = computations.setdefault(name, [])
            entry = name if header.startswith("ENTRY") else entry
            continue
        if stripped == "}":
            current = None
            continue
        if current is None or " = " not in stripped:
            continue
        lhs, _, rhs = stripped.removeprefix("ROOT ").partition(" = ")
        shape, rest = _split_shape(rhs)
        opcode, operands, attributes = _split_call(rest)
        names = re.findall(r"%([\w.\-]+)", operands)
        current.append(Instruction(lhs.lstrip("%"), shape, opcode, names, attributes))
    return computations, entry


def run_counts(computations: dict[str, list[Instruction]], entry: str | None) -> collections.Counter[str | None]:
    """{computation: times it runs per run of the module}. Only control flow is followed: a while loop's body
    (`known_trip_count` times; once if unknown), a call, each branch of a conditional (once each), an async
    computation; fusion, reduction and custom-call bodies are counted at their caller."""
    counts = collections.Counter({entry: 1})
    for name in reversed(list(computations)):  # XLA prints callees before their callers
        times = counts.get(name, 0)
        for inst in computations[name] if times else ():
            called = _control_flow_callees(inst)
            for callee, trips in called:
                if callee in computations:
                    counts[callee] += times * trips
    return counts


def _control_flow_callees(inst):
    """[(computation, runs per run of `inst`)] of a control-flow instruction."""
    def names(key: str) -> list[str]:
        match = re.search(rf"\b{key}=\{{?([^}},]+(?:,\s*%[^}},]+)*)\}}?", inst.attributes)
        return re.findall(r"%?([\w.\-]+)", match[1]) if match else []

    if inst.opcode == "while":
        match = _TRIP_COUNT.search(inst.attributes)
        return [(body, int(match[1]) if match else 1) for body in names("body")]
    if inst.opcode == "call":
        return [(f, 1) for f in names("to_apply")]
    if inst.opcode == "conditional":
        return [(f, 1) for f in names("branch_computations")]
    if inst.opcode == "async-start":
        return [(f, 1) for f in names("calls")]
    return []


@dataclasses.dataclass
class Traffic:
    """Per run of a program: its collectives ({kind: (count, result bytes)}) and the bytes its kernels read and
    write (operands + results of every instruction that runs as a kernel)."""

    collectives: dict
    kernel_bytes: int

    @property
    def collective_bytes(self) -> int:
        return sum(b for _, b in self.collectives.values())


def traffic(text: str) -> Traffic:
    """`Traffic` of a compiled program's HLO text."""
    computations, entry = parse(text)
    counts = run_counts(computations, entry)
    collectives = collections.defaultdict(lambda: [0, 0])
    kernel_bytes = 0
    for name, times in counts.items():
        shapes = {inst.name: inst.bytes for inst in computations[name]}
        for inst in computations[name]:
            kind = inst.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                collectives[kind][0] += times
                collectives[kind][1] += times * _result_bytes(inst)
            if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith("-done"):
                continue
            kernel_bytes += times * (inst.bytes + sum(shapes.get(o, 0) for o in inst.operands))
    return Traffic({k: tuple(v) for k, v in sorted(collectives.items())}, int(kernel_bytes))


def _result_bytes(inst):
    """A collective's result: for an asynchronous start, the last element of its (operands, results, ...) tuple
    pair is what arrives; the plain form's shape is its result."""
    if inst.opcode.endswith("-start") and inst.shape.startswith("("):
        arrays = _ARRAY.findall(inst.shape)
        if len(arrays) >= 2:
            half = [a for a in arrays if a[0] in DTYPE_BYTES][len(arrays) // 2:]
            return shape_bytes(" ".join(f"{d}[{s}]" for d, s in half))
    return inst.bytes
