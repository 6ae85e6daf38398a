"""Seeded state-blob fuzzing of the merged cache, run in its own process by test_reliability.py so
that a crash (abort, segfault) is a test failure that names the mutation, not a dead test run.

    python tests/fuzz_state.py MODEL SEED N

Each mutation is loaded with llama_state_seq_set_data; accepted or refused, the context must then
decode, and the process must live. Prints one line per mutation ("i kind accepted|refused") and
"done N accepted A" at the end.
"""

import random
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydoc_data.topics  # noqa: E402

import mcstate  # noqa: E402
from minicache_gguf import Llama, MergeConfig, kvstate  # noqa: E402
from minicache_gguf.llama import llama_cpp  # noqa: E402

ROW = 192 * 2  # SmolLM2-135M, f16 K/V rows


def main(model, seed, n):
    rng = random.Random(seed)
    llm = Llama(model, n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, kv_merge=MergeConfig(calibration="paper", window=32))
    text = pydoc_data.topics.topics["assignment"]
    toks = llm.tokenize(text.encode())[:200]
    llm.eval(toks[:150])
    llm.eval(toks[150:151])
    blob = kvstate.get_seq_state(llama_cpp, llm._ctx.ctx)
    good = mcstate.parse(blob, ROW)
    mc_off = len(good.prefix)
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    accepted = 0

    def crafted():
        st = mcstate.parse(blob, ROW)
        how = rng.choice(["all_merged_slot", "all_staged", "merged_no_norms", "flip_states", "counts", "slots"])
        for c in st.cells:
            if how == "all_merged_slot" or (how == "flip_states" and rng.random() < 0.3):
                if c.state != mcstate.MERGED:
                    c.state = mcstate.MERGED
                    for pc in c.pools:
                        pc.dist, pc.norms, pc.dir = rng.random(), (1.0, 1.0), bytes(ROW)
                for pc in c.pools:
                    if not pc.rows:
                        pc.rows = (bytes(ROW), bytes(ROW))
            elif how == "all_staged":
                c.state = mcstate.STAGED
                for pc in c.pools:
                    pc.rows = pc.rows or (bytes(ROW), bytes(ROW))
            elif how == "merged_no_norms" and c.state == mcstate.MERGED:
                pc = rng.choice(c.pools)
                pc.dist = rng.choice([float("nan"), -1.0, 2.0, float("inf")])
                pc.norms = (rng.choice([float("nan"), float("inf"), -1.0, 0.0]), 1.0)
        if how == "slots":
            # a slot out of range, or one slot for two cells
            held = [pc for c in st.cells for pc in c.pools if pc.rows]
            pc = rng.choice(held)
            pc.slot = rng.choice([-2, 2**31 - 1, 10**6, rng.choice(held).slot])
        if how == "counts":
            i = rng.randrange(len(st.layout))
            st.layout[i] = rng.choice([0, -1, 1, 2**31 - 1, st.layout[i] + 1, st.layout[i] - 1])
        return how, mcstate.serialize(st, ROW)

    for i in range(n):
        kind = rng.choice(["truncate", "bitflip", "int32", "int32_mc", "crafted", "crafted"])
        b = bytearray(blob)
        if kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "bitflip":
            for _ in range(rng.randint(1, 8)):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
        elif kind in ("int32", "int32_mc"):
            lo = mc_off if kind == "int32_mc" else 0
            j = rng.randrange(lo, len(b) - 4)
            struct.pack_into("<i", b, j, rng.choice([0, -1, 1, 2, 0x7FFFFFFF, -0x80000000, rng.randrange(-2**31, 2**31)]))
        else:
            kind, b = crafted()
            kind = "crafted:" + kind
        try:
            kvstate.set_seq_state(llama_cpp, llm._ctx.ctx, bytes(b))
            ok = True
            accepted += 1
        except kvstate.KvStateError:
            ok = False
        print(i, kind, "accepted" if ok else "refused", flush=True)
        # accepted or not, the context keeps working: continue after the state, then start over
        try:
            if ok:
                llm.n_tokens = 151
                llm.eval(toks[151:153])
        except RuntimeError as e:  # a refused decode is fine; a crash is not
            print(i, "decode refused:", e, flush=True)
        llama_cpp.llama_memory_clear(mem, True)
        llm.n_tokens = 0
        llm.eval(toks[:4])
        llama_cpp.llama_memory_clear(mem, True)
        llm.n_tokens = 0
    print(f"done {n} accepted {accepted}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
