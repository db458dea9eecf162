#!/usr/bin/env python3
"""Generate line-table fixtures for userspace/src/python/linetable.rs.

Run with each interpreter to be covered, from this directory:

    for py in /root/.pyenv/versions/3.{8,9,10,11,12,13}*/bin/python3; do
        "$py" generate.py
    done
    /usr/bin/python3.11 generate.py 3.11-debian

Writes `<major>.<minor>.json` (or `<name>.json` when a name is given) next to
this script. For every code object of a fixed corpus plus the interpreter's
own textwrap.py (recursively through co_consts) it records:

  name        co_qualname / co_name (for humans)
  first_line  co_firstlineno
  table       hex of co_lnotab (3.8, 3.9) or co_linetable (3.10+)
  code_units  len(co_code) // 2
  lines       the line of every code unit, run-length encoded as
              [[line_or_null, count], ...]; the truth comes from the
              interpreter's own C function PyCode_Addr2Line (via ctypes),
              cross-checked against dis.findlinestarts (<= 3.9),
              co_lines() (3.10+) and co_positions() (3.11+)
  co_lines    (3.10+) list(code.co_lines()) converted to code units
              [[start, end, line_or_null], ...]

Only the standard library is used; the script runs unchanged on 3.8-3.13.
"""

import ctypes
import dis
import json
import os
import sys
import types

VERSION = sys.version_info[:2]

# --------------------------------------------------------------------------
# The corpus. Line numbers matter, so the layout is deliberate: a function at
# line 1, big gaps (> 127 and > 255 lines), backward jumps, long single-line
# expressions (> 255 bytes of bytecode on one line), and a function past
# line 70000.

BLANK_300 = "\n" * 300
COMMENTS_200 = "".join("    # filler comment %d\n" % i for i in range(200))
LONG_LINE = "    big = [" + ", ".join("x%d" % (i % 7) for i in range(400)) + "]\n"

CORPUS = (
    "def at_line_one(a, b):\n"
    "    return a + b\n"
    "\n"
    "import os, sys\n"
    "\n"
    "def loops(n):\n"
    "    total = 0\n"
    "    for i in range(n):\n"
    "        if i % 2:\n"
    "            continue\n"
    "        while total < i:\n"
    "            total += 1\n"
    "            if total > 100:\n"
    "                break\n"
    "        else:\n"
    "            total -= 1\n"
    "    return total\n"
    "\n"
    "def big_forward_gap(x):\n"
    "    y = x + 1\n"
    + BLANK_300
    + "    z = y * 2\n"
    + COMMENTS_200
    + "    return z\n"
    "\n"
    "def big_backward_jump(x):\n"
    "    for i in range(x):\n"
    "        pass\n"
    + COMMENTS_200
    + "        x = i\n"
    "    return x\n"
    "\n"
    "def multiline_call(f, a, b):\n"
    "    return f(\n"
    "        a,\n"
    + BLANK_300
    + "        b,\n"
    "        key=(a +\n"
    "             b),\n"
    "    )\n"
    "\n"
    "def long_line(x0, x1, x2, x3, x4, x5, x6):\n"
    + LONG_LINE
    + "    return big\n"
    "\n"
    "def decorator(fn):\n"
    "    return fn\n"
    "\n"
    "@decorator\n"
    "@decorator\n"
    "def decorated(a,\n"
    "              b=1,\n"
    "              *args,\n"
    "              **kw):\n"
    "    '''docstring'''\n"
    "    return a\n"
    "\n"
    "class Klass(object):\n"
    "    attr = 1\n"
    "\n"
    "    @staticmethod\n"
    "    def method(x):\n"
    "        return [y * 2 for y in x if y]\n"
    "\n"
    "    @property\n"
    "    def prop(self):\n"
    "        return {k: v for k, v in self.__dict__.items()}\n"
    "\n"
    "    class Inner:\n"
    "        def deep(self):\n"
    "            return {z for z in range(3)}\n"
    "\n"
    "def comprehensions(xs):\n"
    "    a = [x for x in xs]\n"
    "    b = [(x,\n"
    "          y)\n"
    "         for x in xs\n"
    "         for y in xs\n"
    "         if x != y]\n"
    "    c = (x for x in xs)\n"
    "    d = {x: [y for y in xs] for x in xs}\n"
    "    return a, b, c, d\n"
    "\n"
    "def generator(n):\n"
    "    i = 0\n"
    "    while i < n:\n"
    "        yield i\n"
    "        i += 1\n"
    "    yield from range(n)\n"
    "\n"
    "async def coroutine(x):\n"
    "    await x\n"
    "    async with x as y:\n"
    "        async for z in y:\n"
    "            pass\n"
    "    return [w async for w in x]\n"
    "\n"
    "def exceptions(f):\n"
    "    try:\n"
    "        f()\n"
    "    except ValueError as e:\n"
    "        print(e)\n"
    "    except (TypeError,\n"
    "            KeyError):\n"
    "        raise\n"
    "    else:\n"
    "        return 1\n"
    "    finally:\n"
    "        print('done')\n"
    "    try:\n"
    "        with open(f) as fh, open(f) as gh:\n"
    "            return fh.read()\n"
    "    finally:\n"
    "        pass\n"
    "\n"
    "def lambdas():\n"
    "    f = lambda x: x + 1\n"
    "    g = (lambda x,\n"
    "              y:\n"
    "         x * y)\n"
    "    return f, g, sorted([3, 1], key=lambda v: -v)\n"
    "\n"
    "def nested(a):\n"
    "    def inner(b):\n"
    "        def innermost(c):\n"
    "            return a + b + c\n"
    "        return innermost\n"
    "    return inner\n"
    "\n"
    "def no_code_lines(x):\n"
    "\n"
    "    # a comment\n"
    "\n"
    "    pass\n"
    "\n"
    "\n"
    "    return (\n"
    "\n"
    "        x\n"
    "\n"
    "    )\n"
    "\n"
    "def conditionals(a, b, c):\n"
    "    if (a and\n"
    "            b or\n"
    "            c):\n"
    "        r = 1 if a else 2\n"
    "    elif b:\n"
    "        r = a if (b\n"
    "                  ) else c\n"
    "    else:\n"
    "        r = [a,\n"
    "             b][c]\n"
    "    assert r, 'msg'\n"
    "    del a\n"
    "    global GG\n"
    "    GG = r\n"
    "    return r\n"
    "\n"
    "def fstrings(a, b):\n"
    "    return f'{a!r:>{b}} and {b}' + f'''\n"
    "{a}\n"
    "{b}'''\n"
    "\n"
    "def walrus(xs):\n"
    "    if (n := len(xs)) > 3:\n"
    "        return n\n"
    "    return [y for x in xs if (y := x)]\n"
    "\n"
    "def many_statements(a):\n"
    + "".join("    a = a + %d\n" % i for i in range(150))
    + "    return a\n"
    "\n"
    "def dict_and_calls(a):\n"
    "    return dict(\n"
    "        one=a,\n"
    "        two=a.b.c.d,\n"
    "        three=a[1:2, ::3],\n"
    "        four={**a, 'x': [*a]},\n"
    "    ).get(\n"
    "        'one'\n"
    "    )\n"
    "\n"
    "for _i in range(3):\n"
    "    _j = _i\n"
    "\n"
    "x = [at_line_one(i, i) for i in range(2)]\n"
)

if VERSION >= (3, 10):
    CORPUS += (
        "\n"
        "def matching(cmd):\n"
        "    match cmd:\n"
        "        case [x, y, *rest]:\n"
        "            return x\n"
        "        case {'k': v, **kw}:\n"
        "            return v\n"
        "        case Klass(attr=1) | None:\n"
        "            return 0\n"
        "        case str() as s if s:\n"
        "            return s\n"
        "        case _:\n"
        "            pass\n"
    )

if VERSION >= (3, 11):
    CORPUS += (
        "\n"
        "def groups(f):\n"
        "    try:\n"
        "        f()\n"
        "    except* ValueError:\n"
        "        pass\n"
        "    except* (TypeError, KeyError) as eg:\n"
        "        raise eg\n"
    )

# Pad to beyond line 70000.
CORPUS += "\n" * (70001 - CORPUS.count("\n") - 1)
CORPUS += (
    "def far_away(a, b):\n"  # line 70001
    "    c = a + b\n"
    + "\n" * 200
    + "    return [c for _ in range(a)]\n"
    "\n"
    "class FarClass:\n"
    "    def m(self):\n"
    "        return lambda: (self,\n"
    + "\n" * 140
    + "                        1)\n"
)
assert "def far_away" in CORPUS.splitlines()[70000]

# --------------------------------------------------------------------------

_addr2line = ctypes.pythonapi.PyCode_Addr2Line
_addr2line.argtypes = [ctypes.py_object, ctypes.c_int]
_addr2line.restype = ctypes.c_int


def code_objects(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            for sub in code_objects(const):
                yield sub


def rle(values):
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def expected_lines(code):
    units = len(code.co_code) // 2
    lines = []
    for i in range(units):
        line = _addr2line(code, i * 2)
        if VERSION >= (3, 10) and line < 0:
            line = None
        lines.append(line)

    if VERSION <= (3, 9):
        # The line of an instruction is that of the last line start at or
        # before it.
        starts = dict(dis.findlinestarts(code))
        current = code.co_firstlineno
        for i in range(units):
            current = starts.get(i * 2, current)
            assert current == lines[i], (code, i, current, lines[i])
    else:
        from_co_lines = [None] * units
        for start, end, line in code.co_lines():
            for off in range(start, end, 2):
                from_co_lines[off // 2] = line
        assert from_co_lines == lines, (code, from_co_lines, lines)
    if VERSION >= (3, 11):
        positions = [p[0] for p in code.co_positions()]
        assert positions == lines, (code, positions, lines)
    return lines


def describe(code):
    entry = {
        "name": getattr(code, "co_qualname", code.co_name),
        "first_line": code.co_firstlineno,
    }
    table = code.co_lnotab if VERSION <= (3, 9) else code.co_linetable
    entry["table"] = table.hex()
    entry["code_units"] = len(code.co_code) // 2
    entry["lines"] = rle(expected_lines(code))
    if VERSION >= (3, 10):
        co_lines = []
        for start, end, line in code.co_lines():
            assert start % 2 == 0 and end % 2 == 0, (code, start, end)
            co_lines.append([start // 2, end // 2, line])
        entry["co_lines"] = co_lines
    return entry


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "%d.%d" % VERSION
    module = compile(CORPUS, "corpus.py", "exec")
    # An extra module whose first line is not 1 and whose code starts late.
    late = compile("\n" * 5 + "x = 1\n" + "\n" * 400 + "y = (x,\n\n x)\n", "late.py", "exec")
    # Real-world code too: this interpreter's own textwrap module.
    stdlib_path = os.path.join(os.path.dirname(os.__file__), "textwrap.py")
    with open(stdlib_path) as fh:
        stdlib = compile(fh.read(), stdlib_path, "exec")
    entries = []
    for top in (module, late, stdlib):
        entries += [describe(c) for c in code_objects(top)]
    doc = {
        "version": "%d.%d.%d" % sys.version_info[:3],
        "format": "lnotab" if VERSION <= (3, 9) else ("linetable310" if VERSION == (3, 10) else "locations"),
        "code_objects": entries,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".json")
    with open(path, "w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")
    units = sum(e["code_units"] for e in entries)
    print("%s: %d code objects, %d code units -> %s" % (name, len(entries), units, path))


if __name__ == "__main__":
    main()
