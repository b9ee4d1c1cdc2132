"""Per-chip HBM traffic and interconnect bytes of one step, read from a compiled program's HLO text.

Why not `compiled.cost_analysis()`: on TPU AOT it counts a while loop's body once (the layer scan,
the grad-accumulation scan), and the optimized HLO carries no known_trip_count. So this walks the
text itself: from ENTRY, each `while` multiplies what its body costs by a trip count read from its
condition computation (the integer constant the loop counter is compared against); calls and
conditionals are entered with the same multiplier; fusions are counted whole at their call site,
and the collectives fused into them (TPU's reduce-scatter is an `all-reduce-scatter` fusion) are
counted there too.

HBM bytes: for every top-level instruction that does work (not parameters, constants, tuples,
bitcasts, control flow), its output bytes + its operands' bytes, arrays placed outside HBM
(a layout's memory space S(k), k > 0: host memory, on-chip VMEM) left out. Inside a loop of n trips an array whose leading dimension is n (a stacked
[layers, ...] or [microbatches, ...] buffer) counts 1/n of its bytes: the slice one iteration reads
or writes. An estimate, not a trace: fusions that read a slice of an operand count all of it.

Collective bytes: what one chip sends over the interconnect for each collective, as ring
algorithms move it, from the operand/result shape S (bytes) and the replica group size g:
all-gather (result) and reduce-scatter, all-to-all (operand): S (g - 1) / g; all-reduce:
2 S (g - 1) / g; collective-permute: S.
"""

from __future__ import annotations

import dataclasses
import math
import re

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
             "u4": 0.5}
_SHAPE = re.compile(r"\b(pred|bf16|f8\w*|[fsuc]\d+)\[([\d,]*)\](\{[^}]*\})?")
_COMP_START = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
         "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "async-update", "dynamic-slice-done", "dynamic-update-slice-done", "send-done", "recv-done"}
# opcode -> (what its size is read from, bytes moved per chip as a function of group size g)
_COLLECTIVES = {
    "all-gather": ("out", lambda g: (g - 1) / g), "all-gather-start": ("out", lambda g: (g - 1) / g),
    "reduce-scatter": ("in", lambda g: (g - 1) / g), "all-to-all": ("in", lambda g: (g - 1) / g),
    "all-reduce": ("in", lambda g: 2 * (g - 1) / g), "all-reduce-start": ("in", lambda g: 2 * (g - 1) / g),
    "collective-permute": ("in", lambda g: 1.0), "collective-permute-start": ("in", lambda g: 1.0),
}


@dataclasses.dataclass
class StepTraffic:
  hbm_bytes: float = 0.0  # per chip, one step
  collective_bytes: float = 0.0  # per chip, one step, sent over the interconnect
  by_collective: dict = dataclasses.field(default_factory=dict)  # opcode -> bytes
  unknown_trips: int = 0  # while loops whose trip count could not be read (counted once)


@dataclasses.dataclass
class _Instr:
  name: str
  out: str  # the result type text
  op: str
  rest: str  # operands and attributes


def _arrays(text: str):
  """(bytes, leading dim or None, outside HBM) of every array type in text. A layout's S(k), k > 0,
  places the array in another memory space: on TPU S(5) is host memory, S(1) the core's VMEM
  (filled by copies from HBM, which are counted as such)."""
  for dtype, dims, layout in _SHAPE.findall(text):
    shape = [int(d) for d in dims.split(",") if d]
    size = _ITEMSIZE.get(dtype, 1) * math.prod(shape)
    space = re.search(r"S\((\d+)\)", layout or "")
    yield size, (shape[0] if shape else None), bool(space and space.group(1) != "0")


def parse(text: str):
  """HLO module text -> ({computation: [instructions]}, entry name, {instruction name: result type})."""
  comps, types, entry, current = {}, {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _COMP_START.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.rstrip() == "}":  # not "}}, metadata=...": a custom call's attributes span lines
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      ins = _Instr(*m.groups())
      comps[current].append(ins)
      types[ins.name] = ins.out
  return comps, entry, types


def _operands(rest: str) -> list[str]:
  args = rest.split(")", 1)[0]
  return re.findall(r"%([\w.\-]+)", args)


def _attr(rest: str, name: str) -> str | None:
  m = re.search(name + r"=%?([\w.\-]+)", rest)
  return m.group(1) if m else None


def trip_count(comps, cond: str) -> int | None:
  """The bound a while's condition compares its counter with: `counter < constant`, in the
  condition computation or in a fusion it calls."""
  instrs, todo = [], [cond]
  while todo:  # the condition and the computations it calls (a fused compare)
    comp = comps.get(todo.pop(), [])
    instrs += comp
    todo += [c for i in comp if (c := _attr(i.rest, "calls"))]
  consts = {}
  for i in instrs:
    if i.op == "constant" and re.match(r"[su]\d+\[\]", i.out):
      m = re.match(r"(-?\d+)\)", i.rest)
      if m:
        consts[i.name] = int(m.group(1))
  for i in instrs:
    if i.op == "compare":
      for name in _operands(i.rest):
        if name in consts:
          direction = re.search(r"direction=(\w+)", i.rest)
          return consts[name] + (1 if direction and direction.group(1) == "LE" else 0)
  return max(consts.values()) if consts else None  # a fused compare: the loop's only bound


def group_size(rest: str, devices: int) -> int:
  """Devices in each replica group of a collective (three spellings of replica_groups)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))) or devices
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if m:
    return len(m.group(1).split(","))
  return devices  # {} : every device


def _instr_bytes(ins: _Instr, types: dict, trips: int) -> float:
  total = 0.0
  for text in [ins.out] + [types.get(o, "") for o in _operands(ins.rest)]:
    for size, lead, elsewhere in _arrays(text):
      if elsewhere:
        continue
      total += size / trips if trips > 1 and lead == trips else size
  return total


def step_traffic(text: str, devices: int) -> StepTraffic:
  """HBM and collective bytes per chip of one step of a compiled program (`compiled.as_text()`)."""
  comps, entry, types = parse(text)
  out = StepTraffic()

  def walk(comp: str, mult: float, trips: int, depth: int):
    if depth > 50:
      return
    for ins in comps.get(comp, []):
      if ins.op == "while":
        n = trip_count(comps, _attr(ins.rest, "condition"))
        if n is None:
          out.unknown_trips += 1
          n = 1
        walk(_attr(ins.rest, "body"), mult * n, n, depth + 1)
        continue
      if ins.op in ("call", "async-start"):
        callee = _attr(ins.rest, "to_apply") or _attr(ins.rest, "calls")
        if ins.op == "async-start" and callee:  # an async collective: its computation holds the op
          inner = comps.get(callee, [])
          ops = [i for i in inner if i.op in _COLLECTIVES]
          for i in ops:
            _collective(i, mult)
          continue
        if callee:
          walk(callee, mult, trips, depth + 1)
        continue
      if ins.op == "conditional":
        for callee in re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
                                                   or re.search(r"()", "")).group(1)):
          walk(callee, mult, trips, depth + 1)
        continue
      if ins.op in _COLLECTIVES:
        _collective(ins, mult)
      if ins.op == "fusion":
        fused(_attr(ins.rest, "calls"), mult, depth + 1)
      if ins.op not in _FREE:
        out.hbm_bytes += mult * _instr_bytes(ins, types, trips)

  def fused(comp: str | None, mult: float, depth: int):
    """Collectives the TPU compiler fused with other work (a kCustom fusion): a reduce-scatter is
    an `all-reduce-scatter` computation, an all-reduce followed by each device's slice."""
    if not comp or depth > 50:
      return
    for ins in comps.get(comp, []):
      if ins.op in _COLLECTIVES:
        _collective(ins, mult, "reduce-scatter" if comp.startswith("all-reduce-scatter") else None)
      elif ins.op == "fusion":
        fused(_attr(ins.rest, "calls"), mult, depth + 1)

  def _collective(ins: _Instr, mult: float, as_op: str | None = None):
    side, factor = _COLLECTIVES[as_op or ins.op]
    if side == "out":
      size = max((s for s, _, _ in _arrays(ins.out)), default=0)
    else:
      size = sum(s for o in _operands(ins.rest) for s, _, _ in _arrays(types.get(o, "")))
    moved = mult * size * factor(group_size(ins.rest, devices))
    out.collective_bytes += moved
    kind = (as_op or ins.op).removesuffix("-start")
    out.by_collective[kind] = out.by_collective.get(kind, 0.0) + moved

  if entry:
    walk(entry, 1.0, 1, 0)
  return out
