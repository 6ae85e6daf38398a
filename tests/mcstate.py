"""Read and write the MiniCache section of a merged cache's per-sequence KV state (format v6), so
that tests can forge states a user (or an attacker) could hand to load_state.

Layout (llama_kv_minicache::state_write, patches/llama.cpp/src/llama-kv-cache-minicache.cpp):
  u32 magic "MCKV"; u32 version; u32 n_layout; n_layout x i32 layout; f32 t; f32 gamma; u32 n_cells;
  per cell: u8 state (1 staged, 2 merged); u64 staging order;
    per pool: merged: f32 dist, f32 norm0, f32 norm1; i32 slot (-1: none); a slot: row x0, row x1
    (layer b's row, kept in dir while the cell has a slot); else: row dir (the direction)
"""

import struct
from dataclasses import dataclass, field

MAGIC = 0x564B434D
VERSION = 6
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

    (n_layout,) = take("<I")
    layout = list(take(f"<{n_layout}i"))
    t, gamma, n_cells = take("<ffI")
    cells = []
    for _ in range(n_cells):
        st, seq = take("<BQ")
        cell = Cell(st, seq)
        for _ in range(layout[9]):
            pc = PoolCell()
            if st == MERGED:
                pc.dist, n0, n1 = take("<fff")
                pc.norms = (n0, n1)
            (pc.slot,) = take("<i")
            if pc.slot >= 0:
                pc.rows = (blob[o:o + row], blob[o + row:o + 2 * row])
                o += 2 * row
            else:
                pc.dir = blob[o:o + row]
                o += row
            cell.pools.append(pc)
        cells.append(cell)
    assert o == len(blob), f"{len(blob) - o} bytes after the MiniCache section"
    return McState(blob[:off], layout, t, gamma, cells)


def _unused(used: set):
    return (s for s in range(2**31) if s not in used)


def serialize(st: McState, row: int) -> bytes:
    out = [st.prefix, struct.pack("<III", MAGIC, VERSION, len(st.layout)), struct.pack(f"<{len(st.layout)}i", *st.layout),
           struct.pack("<ffI", st.t, st.gamma, len(st.cells))]
    used = [{c.pools[i].slot for c in st.cells if c.pools[i].rows} for i in range(st.n_pools)]
    free = [_unused(u) for u in used]  # the lowest unused first
    for c in st.cells:
        out.append(struct.pack("<BQ", c.state, c.seq))
        for i, pc in enumerate(c.pools):
            if c.state == MERGED:
                out.append(struct.pack("<fff", pc.dist, *pc.norms))
            slot = -1
            if pc.rows:
                slot = pc.slot
                if slot < 0:
                    slot = next(free[i])
            out.append(struct.pack("<i", slot))
            out.extend(pc.rows if pc.rows else [pc.dir if pc.dir else bytes(row)])
    return b"".join(out)
