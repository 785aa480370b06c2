"""Unix-port side of the kernel benchmark: timing loops and allocation counting.

Run by tests/bench/bench_kernels.py as
    micropython -c "import mpybench; mpybench.main(MIN_MS, REPEATS, 'names')"
with MICROPYPATH = tests/bench/mpy : firmware/ (the viper build) or a stripped copy of
firmware/ (the bytecode build). It prints one JSON line per case, prefixed with @@BENCH@@.

Timing: a case is a callable plus its arguments and an empty viper function with the
same signature. Both are called from the same loop; the empty one measures the loop and
call overhead, which is subtracted. Every figure is the best of REPEATS runs, each long
enough (>= MIN_MS) that timer resolution does not matter.
"""

import gc
import json
import time

import micropython


def _make_loop(arity):
    # One loop per arity with the arguments unpacked once, outside the timed loop, so
    # each iteration is exactly one call (no *args packing, which would allocate).
    names = ", ".join("a%d" % i for i in range(arity))
    src = "def loop(f, args, n):\n"
    if arity:
        src += "    %s, = args\n" % names
    src += "    for _ in range(n):\n        f(%s)\n" % names
    ns = {}
    exec(src, ns)
    return ns["loop"]


_LOOPS = [_make_loop(i) for i in range(10)]


def _run(loop, f, args, n):
    t = time.time_ns()
    loop(f, args, n)
    return time.time_ns() - t


def _calibrate(loop, f, args, min_ns):
    n = 8
    while True:
        t = _run(loop, f, args, n)
        if t >= min_ns:
            return n
        n *= 8 if 0 < t < min_ns // 8 else 2


def measure(f, empty, args, min_ns, repeats):
    """Best ns per call of f(*args) and of empty(*args), and the n used for f.

    The two are timed alternately, so a burst of load from elsewhere on the machine
    hits both rather than only one of them.
    """
    loop = _LOOPS[len(args)]
    n = _calibrate(loop, f, args, min_ns)
    m = _calibrate(loop, empty, args, min_ns)
    best = best_empty = None
    for _ in range(repeats):
        t = _run(loop, f, args, n) / n
        if best is None or t < best:
            best = t
        t = _run(loop, empty, args, m) / m
        if best_empty is None or t < best_empty:
            best_empty = t
    return best, best_empty, n


def _alloc(loop, f, args, n):
    gc.collect()
    gc.disable()
    try:
        total = micropython.mem_total()
        held = gc.mem_alloc()
        loop(f, args, n)
        return micropython.mem_total() - total, gc.mem_alloc() - held
    finally:
        gc.enable()


def alloc_per_call(f, args, n=1000):
    """(bytes allocated, bytes still held) per call, with the GC off.

    Allocated counts every heap allocation (micropython.mem_total), including bytecode
    frames too big for the C stack, which the VM takes from the heap and frees on
    return; held is the net growth of the heap (gc.mem_alloc), i.e. garbage the GC
    would eventually have to collect. Both are counted over n and 2n calls and
    differenced, which cancels the constant cost of the measurement itself.
    """
    loop = _LOOPS[len(args)]
    loop(f, args, 10)  # warm-up: first calls may intern or cache
    a = _alloc(loop, f, args, n)
    b = _alloc(loop, f, args, 2 * n)
    return (b[0] - a[0]) / n, (b[1] - a[1]) / n


def heap_lock_ok(f, args, n=100):
    """True if n calls run with the heap locked (what the node's tests require)."""
    loop = _LOOPS[len(args)]
    micropython.heap_lock()
    try:
        loop(f, args, n)
        return True
    except MemoryError:
        return False
    finally:
        micropython.heap_unlock()


def main(min_ms, repeats, names=""):
    import cases

    min_ns = int(min_ms * 1000000)
    wanted = [s for s in names.split(",") if s]
    for name in cases.NAMES:
        if wanted and name not in wanted:
            continue
        try:
            f, args, empty, note = cases.make(name)
        except ImportError as e:
            print("@@BENCH@@" + json.dumps({"kernel": name, "error": "missing: %s" % e}))
            continue
        except Exception as e:
            print("@@BENCH@@" + json.dumps({"kernel": name, "error": "%s: %s" % (type(e).__name__, e)}))
            continue
        raw, base, n = measure(f, empty, args, min_ns, repeats)
        # The empty twin runs the same driver code (see cases._TickDriver), so the
        # difference is what the measured code itself allocates.
        fa, fh = alloc_per_call(f, args)
        ea, eh = alloc_per_call(empty, args)
        print("@@BENCH@@" + json.dumps({
            "kernel": name, "raw_ns": raw, "base_ns": base, "ns": raw - base,
            "n": n, "alloc": fa - ea, "held": fh - eh, "locked_ok": heap_lock_ok(f, args),
            "note": note,
        }))
