"""Execute ``@micropython.viper`` source under CPython at a chosen native-int width.

Why: viper ints are 64-bit in the x64 unix port but 32-bit on the ESP32, so a kernel
that passes every unix-port test can still overflow on the chip. This shim runs the
*same source* with every arithmetic step computed twice -- exactly (Python ints) and
wrapped to the native width -- and records each step where they differ, with its line.

How:
* ``ast``-parse the module, find functions decorated ``@micropython.viper``/``@viper``.
* Rewrite their ``BinOp``/``AugAssign``/unary ``-``/``~`` into ``__vshim.binop(op, a, b,
  line)`` calls that return the width-wrapped result and log an ``Overflow`` when the
  exact result differs. Lines carrying ``# wrap-ok: <reason>`` may wrap (logged as
  allowed, e.g. the sign-extension idiom ``(v ^ s) - s``).
* ``ptr8``/``ptr16``/``ptr32``, ``int()``/``uint()`` inside those functions become shims
  with the real load semantics: at width 64, 32-bit loads are zero-extended (x64 unix
  port); at width 32 they are signed (ESP32); 8/16-bit loads are unsigned at both.
  Stores keep the low bits. Out-of-range pointer indexes, division/modulo by zero and
  bad shift counts raise ``ViperTrap`` (the real chip would corrupt memory or die).
* Arguments annotated ``int``/``uint`` are truncated to the width on entry, like
  ``mp_obj_get_int_truncated``; ``-> int`` results are wrapped.
* Static checks: int literals (or constant-folded expressions, including ``const()``
  names) of 2**30 or more, which compile for x64 but not for the ESP32, and default /
  keyword-only arguments, which viper mishandles.

Limits: all arithmetic inside a viper function is treated as native-int arithmetic
(true for kernels whose scalar args are annotated and whose values come from pointer
loads); object arithmetic inside viper functions is not modelled.

Usage::

    mod = viper32.load("firmware/canopy/condition.py", width=32)
    mod.condition_kernel(raw, hist, ema, shift, out, 3, 0, 1 << 31)
    assert not mod.overflows()          # unexpected wraps only
    print(mod.static_issues)

Command line: ``python tests/viper32.py MODULE.py`` lists the viper functions and
static issues of a module.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL_INT_LIMIT = 1 << 30  # ESP32 small ints are 31-bit; viper literals must stay below
WRAP_OK = re.compile(r"#\s*wrap-ok:\s*\S")

_OPS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
}


class ViperTrap(Exception):
    """The operation would crash or corrupt memory on a real port."""


class UInt(int):
    """A viper ``uint`` value: arithmetic with it wraps to the unsigned range."""


@dataclass(frozen=True)
class Overflow:
    line: int
    op: str
    operands: tuple[int, ...]
    exact: int
    wrapped: int
    allowed: bool
    source: str

    def __str__(self) -> str:
        args = f" {self.op} ".join(str(v) for v in self.operands)
        if len(self.operands) == 1:
            args = f"{self.op}{self.operands[0]}"
        tag = "allowed wrap" if self.allowed else "OVERFLOW"
        return f"line {self.line}: {tag}: {args} = {self.exact}, wraps to {self.wrapped}  | {self.source.strip()}"


def wrap(value: int, width: int) -> int:
    """Two's-complement wrap of an unbounded int to a signed `width`-bit value."""
    m = 1 << width
    v = value & (m - 1)
    return v - m if v >= m >> 1 else v


class _Ptr:
    """ptrN over a writable buffer with the port's load/store semantics."""

    def __init__(self, shim: "Shim", buf: Any, size: int, line: int) -> None:
        if isinstance(buf, _Ptr):
            buf = buf.obj
        if isinstance(buf, int):
            raise ViperTrap(f"line {line}: ptr{size * 8} of a raw address is not modelled")
        self.obj = buf
        self.mv = memoryview(buf).cast("B")
        self.size = size
        # x64 unix port: 32-bit loads are zero-extended into the 64-bit register.
        self.signed = size == 4 and shim.width == 32
        self.shim = shim
        self.line = line

    def _offset(self, index: int) -> int:
        off = int(index) * self.size
        if off < 0 or off + self.size > len(self.mv):
            raise ViperTrap(
                f"line {self.line}: ptr{self.size * 8}[{int(index)}] outside a "
                f"{len(self.mv)}-byte buffer"
            )
        return off

    def __getitem__(self, index: int) -> int:
        off = self._offset(index)
        return int.from_bytes(self.mv[off : off + self.size], "little", signed=self.signed)

    def __setitem__(self, index: int, value: int) -> None:
        off = self._offset(index)
        v = int(value) & ((1 << (8 * self.size)) - 1)
        self.mv[off : off + self.size] = v.to_bytes(self.size, "little")


class Shim:
    """Arithmetic and builtins for transformed viper code at one width."""

    def __init__(self, width: int, allowed_lines: set[int], lines: list[str]) -> None:
        if width not in (32, 64):
            raise ValueError("width must be 32 or 64")
        self.width = width
        self.allowed_lines = allowed_lines
        self.lines = lines
        self.events: list[Overflow] = []

    # -- arithmetic -------------------------------------------------------------
    def _check(self, v: Any, line: int) -> int:
        if isinstance(v, bool):
            return int(v)
        if not isinstance(v, int):
            raise TypeError(f"line {line}: viper32 models native ints only, got {type(v).__name__}")
        return v

    def _finish(self, op: str, operands: tuple[int, ...], exact: int, unsigned: bool, line: int):
        if unsigned:
            wrapped: int = UInt(exact & ((1 << self.width) - 1))
        else:
            wrapped = wrap(exact, self.width)
        if wrapped != exact:
            self.events.append(
                Overflow(
                    line,
                    op,
                    operands,
                    exact,
                    int(wrapped),
                    line in self.allowed_lines,
                    self.lines[line - 1] if 0 < line <= len(self.lines) else "",
                )
            )
        return wrapped

    def binop(self, op: str, a: Any, b: Any, line: int) -> int:
        a = self._check(a, line)
        b = self._check(b, line)
        unsigned = isinstance(a, UInt) or isinstance(b, UInt)
        x, y = int(a), int(b)
        if op == "+":
            r = x + y
        elif op == "-":
            r = x - y
        elif op == "*":
            r = x * y
        elif op in ("//", "%"):
            if y == 0:
                raise ViperTrap(f"line {line}: viper {op} by zero is unchecked (the port crashes)")
            r = x // y if op == "//" else x % y
        elif op in ("<<", ">>"):
            if y < 0 or y >= self.width:
                raise ViperTrap(f"line {line}: shift count {y} outside 0..{self.width - 1}")
            r = x << y if op == "<<" else x >> y
        elif op == "&":
            r = x & y
        elif op == "|":
            r = x | y
        elif op == "^":
            r = x ^ y
        else:  # pragma: no cover - the transformer only emits the ops above
            raise ValueError(op)
        return self._finish(op, (x, y), r, unsigned, line)

    def unary(self, op: str, a: Any, line: int) -> int:
        a = self._check(a, line)
        unsigned = isinstance(a, UInt)
        x = int(a)
        r = -x if op == "-" else ~x if op == "~" else x
        return self._finish(op, (x,), r, unsigned, line)

    # -- builtins inside viper functions -------------------------------------------
    def int_(self, v: Any) -> int:
        return wrap(int(v), self.width)

    def uint_(self, v: Any) -> int:
        return UInt(int(v) & ((1 << self.width) - 1))

    def ptr8(self, buf: Any, line: int = 0) -> _Ptr:
        return _Ptr(self, buf, 1, line)

    def ptr16(self, buf: Any, line: int = 0) -> _Ptr:
        return _Ptr(self, buf, 2, line)

    def ptr32(self, buf: Any, line: int = 0) -> _Ptr:
        return _Ptr(self, buf, 4, line)

    def entry(self, kinds: list[str], ret: str, name: str) -> Callable[[Callable], Callable]:
        """Decorator applying viper's argument and return conversions."""

        def deco(fn: Callable) -> Callable:
            def wrapper(*args: Any) -> Any:
                if len(args) != len(kinds):
                    raise TypeError(f"{name}() takes {len(kinds)} positional arguments, got {len(args)}")
                conv = []
                for kind, v in zip(kinds, args):
                    if kind == "int":
                        conv.append(wrap(int(v), self.width))
                    elif kind == "uint":
                        conv.append(UInt(int(v) & ((1 << self.width) - 1)))
                    elif kind in ("ptr8", "ptr16", "ptr32"):
                        conv.append(getattr(self, kind)(v))
                    else:
                        conv.append(v)
                r = fn(*conv)
                if ret == "int":
                    return wrap(int(r), self.width)
                if ret == "uint":
                    return int(r) & ((1 << self.width) - 1)
                if ret == "bool":
                    return bool(r)
                return r

            wrapper.__name__ = name
            wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
            return wrapper

        return deco


def _is_viper(dec: ast.expr) -> bool:
    if isinstance(dec, ast.Attribute):
        return dec.attr == "viper"
    return isinstance(dec, ast.Name) and dec.id == "viper"


def _kind(ann: ast.expr | None) -> str:
    if isinstance(ann, ast.Name) and ann.id in ("int", "uint", "bool", "ptr8", "ptr16", "ptr32"):
        return ann.id
    return "object"


def _shim_attr(name: str) -> ast.Attribute:
    return ast.Attribute(value=ast.Name(id="__vshim", ctx=ast.Load()), attr=name, ctx=ast.Load())


class _Rewriter(ast.NodeTransformer):
    """Rewrite the body of one viper function."""

    def __init__(self, consts: dict[str, int], issues: list[str], fname: str) -> None:
        self.consts = consts
        self.issues = issues
        self.fname = fname

    def _fold(self, node: ast.expr) -> int | None:
        """Value of a constant expression as MicroPython's compiler would fold it."""
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.consts:
            return self.consts[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert, ast.UAdd)):
            v = self._fold(node.operand)
            if v is None:
                return None
            return -v if isinstance(node.op, ast.USub) else ~v if isinstance(node.op, ast.Invert) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = self._fold(node.left), self._fold(node.right)
            if a is None or b is None:
                return None
            try:
                return eval(f"a {_OPS[type(node.op)]} b", {}, {"a": a, "b": b})  # noqa: S307 - ints only
            except (ZeroDivisionError, ValueError, OverflowError):
                return None
        return None

    def _check_const(self, node: ast.expr) -> None:
        v = self._fold(node)
        if v is not None and not (-SMALL_INT_LIMIT <= v < SMALL_INT_LIMIT):
            self.issues.append(
                f"{self.fname} line {node.lineno}: constant {v} is outside the ESP32 small-int "
                f"range (|v| < 2**30); pass it in as an argument"
            )

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        self._check_const(node)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        if type(node.op) not in _OPS:
            if isinstance(node.op, ast.Pow):
                self.issues.append(f"{self.fname} line {node.lineno}: viper has no ** operator")
            return self.generic_visit(node)
        folded = self._fold(node)
        if folded is not None:
            self._check_const(node)
            return ast.copy_location(ast.Constant(value=folded), node)
        self.generic_visit(node)
        call = ast.Call(
            func=_shim_attr("binop"),
            args=[ast.Constant(_OPS[type(node.op)]), node.left, node.right, ast.Constant(node.lineno)],
            keywords=[],
        )
        return ast.copy_location(call, node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        if isinstance(node.op, (ast.USub, ast.Invert)):
            folded = self._fold(node)
            if folded is not None:
                self._check_const(node)
                return ast.copy_location(ast.Constant(value=folded), node)
            self.generic_visit(node)
            op = "-" if isinstance(node.op, ast.USub) else "~"
            call = ast.Call(
                func=_shim_attr("unary"),
                args=[ast.Constant(op), node.operand, ast.Constant(node.lineno)],
                keywords=[],
            )
            return ast.copy_location(call, node)
        return self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.stmt:
        if type(node.op) not in _OPS:
            return self.generic_visit(node)
        load_target = _as_load(node.target)
        binop = ast.copy_location(ast.BinOp(left=load_target, op=node.op, right=node.value), node)
        new = ast.Assign(targets=[node.target], value=self.visit_BinOp(binop))
        # The target's own sub-expressions (e.g. an index) still need rewriting.
        new.targets = [self.visit(node.target)]
        return ast.copy_location(new, node)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Name):
            if f.id in ("ptr8", "ptr16", "ptr32"):
                node.func = _shim_attr(f.id)
                node.args = node.args + [ast.Constant(node.lineno)]
            elif f.id in ("int", "uint"):
                node.func = _shim_attr(f.id + "_")
        return node


def _as_load(target: ast.expr) -> ast.expr:
    import copy

    t = copy.deepcopy(target)
    for n in ast.walk(t):
        if hasattr(n, "ctx"):
            n.ctx = ast.Load()
    return t


@dataclass
class ViperModule:
    """A module whose viper functions run through the shim at `width`."""

    path: str
    width: int
    namespace: dict[str, Any]
    shim: Shim
    viper_functions: list[str]
    static_issues: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.namespace[name]
        except KeyError:
            raise AttributeError(name) from None

    def overflows(self) -> list[Overflow]:
        """Wraps on lines not marked ``# wrap-ok:`` since the last clear()."""
        return [e for e in self.shim.events if not e.allowed]

    def allowed_wraps(self) -> list[Overflow]:
        return [e for e in self.shim.events if e.allowed]

    def clear(self) -> None:
        self.shim.events.clear()


def _fake_micropython() -> types.ModuleType:
    mp = types.ModuleType("micropython")
    mp.const = lambda x: x  # type: ignore[attr-defined]
    mp.viper = lambda f: f  # type: ignore[attr-defined]
    mp.native = lambda f: f  # type: ignore[attr-defined]
    mp.heap_lock = lambda: 0  # type: ignore[attr-defined]
    mp.heap_unlock = lambda: 0  # type: ignore[attr-defined]
    mp.mem_info = lambda *a: None  # type: ignore[attr-defined]
    return mp


def _fake_time() -> types.ModuleType:
    """CPython's time plus the MicroPython ms/us helpers firmware modules import."""
    import time as _t

    mt = types.ModuleType("time")
    mt.__dict__.update({k: getattr(_t, k) for k in dir(_t) if not k.startswith("__")})
    mt.sleep_ms = lambda ms: None  # type: ignore[attr-defined]
    mt.sleep_us = lambda us: None  # type: ignore[attr-defined]
    mt.ticks_ms = lambda: int(_t.monotonic() * 1000) & 0x3FFFFFFF  # type: ignore[attr-defined]
    mt.ticks_us = lambda: int(_t.monotonic() * 1_000_000) & 0x3FFFFFFF  # type: ignore[attr-defined]
    mt.ticks_add = lambda a, b: (a + b) & 0x3FFFFFFF  # type: ignore[attr-defined]
    mt.ticks_diff = lambda a, b: ((a - b + 0x20000000) & 0x3FFFFFFF) - 0x20000000  # type: ignore[attr-defined]
    return mt


def _builtins_for_firmware() -> dict[str, Any]:
    """Builtins whose __import__ serves MicroPython-only modules to the loaded module."""
    fakes = {"micropython": _fake_micropython(), "time": _fake_time(), "utime": _fake_time()}
    real_import = builtins.__import__

    def _import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and name in fakes:
            return fakes[name]
        return real_import(name, globals, locals, fromlist, level)

    b = dict(builtins.__dict__)
    b["__import__"] = _import
    return b


def _module_consts(tree: ast.Module) -> dict[str, int]:
    consts: dict[str, int] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "const"
            and node.value.args
        ):
            try:
                v = eval(compile(ast.Expression(node.value.args[0]), "<const>", "eval"), {}, dict(consts))  # noqa: S307
            except Exception:  # noqa: BLE001 - non-int consts are simply not folded
                continue
            if isinstance(v, int):
                consts[node.targets[0].id] = v
    return consts


def transform(source: str, filename: str = "<viper>") -> tuple[ast.Module, list[str], list[str], set[int]]:
    """Rewrite the viper functions of `source`; return (tree, viper names, static issues, wrap-ok lines)."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    allowed = {i + 1 for i, text in enumerate(lines) if WRAP_OK.search(text)}
    consts = _module_consts(tree)
    issues: list[str] = []
    names: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not any(_is_viper(d) for d in node.decorator_list):
            continue
        names.append(node.name)
        a = node.args
        if a.defaults or a.kw_defaults or a.kwonlyargs or a.vararg or a.kwarg:
            issues.append(
                f"{node.name} line {node.lineno}: viper functions need plain positional "
                f"arguments (no defaults, keyword-only, *args or **kwargs)"
            )
        kinds = [_kind(arg.annotation) for arg in a.posonlyargs + a.args]
        ret = _kind(node.returns)
        for arg in a.posonlyargs + a.args:
            arg.annotation = None
        node.returns = None
        rw = _Rewriter(consts, issues, node.name)
        node.body = [rw.visit(stmt) for stmt in node.body]
        node.decorator_list = [
            ast.Call(
                func=_shim_attr("entry"),
                args=[
                    ast.List(elts=[ast.Constant(k) for k in kinds], ctx=ast.Load()),
                    ast.Constant(ret),
                    ast.Constant(node.name),
                ],
                keywords=[],
            )
        ]
    ast.fix_missing_locations(tree)
    return tree, names, issues, allowed


def load(
    path: str | Path,
    width: int = 32,
    *,
    whole_module: bool = True,
    extra_path: Iterable[str | Path] = (),
) -> ViperModule:
    """Load a firmware module with its viper functions shimmed at `width` bits.

    whole_module=True executes the entire module (classes included) under CPython with
    a stub ``micropython`` module, so class-level code drives the shimmed kernels.
    whole_module=False executes only ``const()`` assignments and the viper functions,
    for modules that cannot import under CPython (e.g. they need ``machine``).
    """
    path = Path(path)
    source = path.read_text()
    tree, names, issues, allowed = transform(source, str(path))
    if not whole_module:
        keep: list[ast.stmt] = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                keep.append(node)
            elif (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "const"
            ):
                keep.append(node)
        tree = ast.Module(body=keep, type_ignores=[])
    shim = Shim(width, allowed, source.splitlines())
    ns: dict[str, Any] = {
        "__name__": f"viper32_{path.stem}_{width}",
        "__file__": str(path),
        "__vshim": shim,
        "const": lambda x: x,
        "__builtins__": _builtins_for_firmware(),
    }
    code = compile(tree, str(path), "exec")
    saved_mp = sys.modules.get("micropython")
    added = [str(p) for p in extra_path if str(p) not in sys.path]
    sys.path[:0] = added
    sys.modules["micropython"] = _fake_micropython()
    try:
        exec(code, ns)  # noqa: S102 - executing the repository's own firmware source
    finally:
        if saved_mp is None:
            sys.modules.pop("micropython", None)
        else:
            sys.modules["micropython"] = saved_mp
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    return ViperModule(str(path), width, ns, shim, names, issues)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/viper32.py MODULE.py", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"viper32: no such file: {path}", file=sys.stderr)
        return 2
    try:
        _tree, names, issues, allowed = transform(path.read_text(), str(path))
    except SyntaxError as exc:
        print(f"viper32: {path} does not parse: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: viper functions: {', '.join(names) or '(none)'}")
    print(f"lines allowed to wrap: {sorted(allowed)}")
    for issue in issues:
        print("ISSUE:", issue)
    return 1 if issues else 0


def load_widths(path: str | Path, **kwargs: Any) -> dict[int, ViperModule]:
    """The module shimmed at width 32 (ESP32) and 64 (x64 unix port)."""
    return {w: load(path, w, **kwargs) for w in (32, 64)}


def run_widths(mods: dict[int, ViperModule], call: Callable[[ViperModule], Any]) -> Any:
    """Run `call(mod)` at every width; fail on unexpected wraps or width-dependent results.

    Returns the width-32 result (what the ESP32 computes).
    """
    results = {}
    for width, mod in sorted(mods.items()):
        mod.clear()
        results[width] = call(mod)
        bad = mod.overflows()
        if bad:
            raise AssertionError(f"{mod.path} at width {width}:\n" + "\n".join(map(str, bad[:10])))
    first = results[min(results)]
    for width, r in results.items():
        if r != first:
            raise AssertionError(f"{mods[width].path}: width {width} gives {r!r}, width {min(results)} gives {first!r}")
    return results.get(32, first)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
