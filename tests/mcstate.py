"""Read and write the MiniCache section of a merged cache's per-sequence KV state (format v7), so
that tests can forge states a user (or an attacker) could hand to load_state.

Layout (llama_kv_minicache::state_write, patches/llama.cpp/src/llama-kv-cache-minicache-state.cpp):
  u32 magic "MCKV"; u32 version; u32 n_layout; n_layout x i32 layout; f32 t; f32 gamma; u32 n_cells;
  per cell: u8 state (1 staged, 2 merged); u64 staging order;
  per pool: n_cells x i32 slot (-1: none); n_cells x (f32 dist, f32 norm0, f32 norm1) (0 for a staged
    cell); the exact rows x0 of the slots held, in ascending slot order; dir of every cell, in cell
    order (x1, layer b's row, while the cell has a slot; else the direction). A pool stored transposed
    (V of a float type) writes each of those two row sets element-major: for each row element, its
    value in every row.
"""

import struct
from dataclasses import dataclass, field

MAGIC = 0x564B434D
VERSION = 7
STAGED, MERGED = 1, 2


@dataclass
class PoolCell:
    dist: float = 0.0
    norms: tuple = (0.0, 0.0)
    dir: bytes = b""  # the direction (a merged cell without a slot)
    rows: tuple = ()  # (x0, x1) when the cell has an exact slot
    slot: int = -1    # that slot (serialize() gives rows without one the lowest unused slots)


@dataclass
class Cell:
    state: int
    seq: int
    pools: list = field(default_factory=list)


@dataclass
class McState:
    prefix: bytes  # the stock part of the blob (cells, dense layers)
    layout: list
    t: float
    gamma: float
    cells: list

    @property
    def n_pools(self) -> int:
        return self.layout[9]


def _trans(layout: list, i: int) -> bool:
    """Pool i is stored transposed: a V pool of a float type (f32, f16, bf16)."""
    return layout[10 + 5 * i] == 1 and layout[6] in (0, 1, 30)


def _rows_out(rows: list, row: int, trans: bool, es: int = 2) -> bytes:
    if not trans or not rows:
        return b"".join(rows)
    n_embd = row // es
    return b"".join(r[j * es:(j + 1) * es] for j in range(n_embd) for r in rows)


def _rows_in(data: bytes, n: int, row: int, trans: bool, es: int = 2) -> list:
    if not trans:
        return [data[i * row:(i + 1) * row] for i in range(n)]
    n_embd = row // es
    return [b"".join(data[(j * n + i) * es:(j * n + i + 1) * es] for j in range(n_embd)) for i in range(n)]


def parse(blob: bytes, row: int) -> McState:
    """row: bytes of one K/V row of a pool (the default model at f16: 192 x 2)."""
    off = blob.find(struct.pack("<II", MAGIC, VERSION))
    assert off > 0, f"no MiniCache v{VERSION} section in this blob"
    o = off + 8

    def take(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, blob, o)
        o += struct.calcsize(fmt)
        return v

    def take_rows(n, trans):
        nonlocal o
        out = _rows_in(blob[o:o + n * row], n, row, trans)
        o += n * row
        return out

    (n_layout,) = take("<I")
    layout = list(take(f"<{n_layout}i"))
    t, gamma, n_cells = take("<ffI")
    cells = [Cell(*take("<BQ")) for _ in range(n_cells)]
    for i in range(layout[9]):
        slots = take(f"<{n_cells}i")
        meta = take(f"<{3 * n_cells}f")
        held = sorted(s for s in slots if s >= 0)
        x0 = dict(zip(held, take_rows(len(held), _trans(layout, i))))
        dirs = take_rows(n_cells, _trans(layout, i))
        for k, c in enumerate(cells):
            pc = PoolCell(slot=slots[k])
            if c.state == MERGED:
                pc.dist, pc.norms = meta[3 * k], (meta[3 * k + 1], meta[3 * k + 2])
            if pc.slot >= 0:
                pc.rows = (x0[pc.slot], dirs[k])
            else:
                pc.dir = dirs[k]
            c.pools.append(pc)
    assert o == len(blob), f"{len(blob) - o} bytes after the MiniCache section"
    return McState(blob[:off], layout, t, gamma, cells)


def _unused(used: set):
    return (s for s in range(2**31) if s not in used)


def serialize(st: McState, row: int) -> bytes:
    out = [st.prefix, struct.pack("<III", MAGIC, VERSION, len(st.layout)), struct.pack(f"<{len(st.layout)}i", *st.layout),
           struct.pack("<ffI", st.t, st.gamma, len(st.cells))]
    out += [struct.pack("<BQ", c.state, c.seq) for c in st.cells]
    for i in range(st.n_pools):
        used = {c.pools[i].slot for c in st.cells if c.pools[i].rows}
        free = _unused(used)  # rows without a slot get the lowest unused ones
        slots, meta, x0, dirs = [], [], {}, []
        for c in st.cells:
            pc = c.pools[i]
            slot = -1
            if pc.rows:
                slot = pc.slot if pc.slot >= 0 else next(free)
                x0.setdefault(slot, pc.rows[0])
                dirs.append(pc.rows[1])
            else:
                dirs.append(pc.dir if pc.dir else bytes(row))
            slots.append(slot)
            meta += [pc.dist, *pc.norms] if c.state == MERGED else [0.0, 0.0, 0.0]
        held = sorted(s for s in slots if s >= 0)  # a forged duplicate slot is written twice
        out += [struct.pack(f"<{len(slots)}i", *slots), struct.pack(f"<{len(meta)}f", *meta),
                _rows_out([x0[s] for s in held], row, _trans(st.layout, i)), _rows_out(dirs, row, _trans(st.layout, i))]
    return b"".join(out)
