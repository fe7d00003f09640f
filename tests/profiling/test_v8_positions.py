"""V8's source position table decoding (receiver/profiling/runtimes/v8.py, decode_positions).

The bytes are the table Node 20 made for this function (read from the process), and the offsets
and positions are what ``node --print-bytecode`` printed for it::

    function interp(n) {
      let s = 0;
      s += n;
      try { throw new Error('x'); } catch (e) { void e.stack; }
      return s;
    }

       31 S> @    0 : 0c          LdaZero
       36 S> @    2 : 0b 03       Ldar a0
       41 E> @    4 : 38 fa 00    Add r0, [0]
       52 S> @   14 : 21 00 01    LdaGlobal [0], [1]
       58 E> @   23 : 69 f8 f7 01 03  Construct r2, r3-r3, [3]
       52 E> @   28 : a7          Throw
       88 S> @   40 : 17 02       LdaImmutableCurrentContextSlot [2]
       95 E> @   43 : 2d f7 03 05 GetNamedProperty r3, [3], [5]
"""

from __future__ import annotations

import pytest

from receiver.profiling.runtimes.v8 import FunctionInfo, decode_positions

TABLE = bytes.fromhex("0140024004140514142c13180b17189001071c0e2c0424")


def test_a_bytecode_table_decodes_to_v8s_own_listing() -> None:
    got = decode_positions(TABLE)
    assert got[0] == (-1, 15)               # the function entry: its position, before offset 0
    assert got[1:9] == [(0, 31), (2, 36), (4, 41), (14, 52), (23, 58), (28, 52), (40, 88), (43, 95)]
    assert [o for o, _ in got] == sorted(o for o, _ in got)


def test_a_truncated_table_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_positions(TABLE[:-1] + b"\x80")     # a last byte that says more follow


def test_a_frame_offset_names_the_statement_it_is_in() -> None:
    info = FunctionInfo("f", "f.js", 10, (0, 0), offsets=(52, 53, 60, 70), lines=(10, 11, 12, 14))
    assert info.line_at(53) == 11 and info.line_at(59) == 11 and info.line_at(60) == 12
    assert info.line_at(1000) == 14
    assert info.line_at(10) is None         # before the table: the caller keeps the first line
