"""The pure parts of a build's output path: masking secrets, capping what is stored.

Nothing here touches the database, Redis or threads, so the parts that must be
exactly right (a secret never reaching the log, a capped log never holding half
a character, a database copy never missing a byte) can be tested on their own,
with every way a stream can be cut into chunks.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

MASK = "xxxxxx"
# Masking a value of a few characters would black out common words all over
# the log while hiding next to nothing, so such values are left alone.
MIN_MASKED = 6


class Masker:
    """Replaces secret values in a stream of text, however the stream is chunked.

    The end of each chunk that could still be the start of a value is held
    back until the next chunk, or flush(), settles it. Overlapping and adjacent
    occurrences become a single MASK, so the log does not show where one value
    ends and the next begins. The output is the same as masking the whole
    stream at once.
    """

    def __init__(self, values: Iterable[str]):
        distinct = set(values)
        self._values = sorted(v for v in distinct if len(v) >= MIN_MASKED)
        # A count, because names are not known here: the caller logs it.
        self.short = sum(1 for v in distinct if 0 < len(v) < MIN_MASKED)
        # An occurrence not yet complete starts within this many characters of the end.
        self._hold = max(map(len, self._values), default=1) - 1
        self._carry = ""
        # How much of _carry the MASK just emitted covers, while a later
        # occurrence could still touch it and so belongs in the same MASK;
        # None when no emitted MASK can grow.
        self._open: int | None = None

    @property
    def active(self) -> bool:
        return bool(self._values)

    def __bool__(self) -> bool:
        return self.active

    def feed(self, text: str) -> str:
        """Mask a chunk, returning what is safe to emit now.

        Up to one character less than the longest value is kept back, since
        the next chunk could make it a value.
        """
        if not self._values:
            return text
        return self._mask(text, final=False)

    def flush(self) -> str:
        """Mask and return what feed() held back; call it at the end of a stream."""
        if not self._values:
            return ""
        return self._mask("", final=True)

    def _mask(self, text: str, final: bool) -> str:
        combined = self._carry + text
        # Every occurrence not yet found would start at or after `safe`, so
        # nothing before it can change any more.
        safe = len(combined) if final else max(len(combined) - self._hold, 0)
        found = []
        for value in self._values:
            i = combined.find(value)
            while i >= 0:
                found.append((i, i + len(value)))
                i = combined.find(value, i + 1)
        found.sort()

        pieces = []
        done = self._open or 0  # combined[:done] has been emitted
        growing = self._open is not None  # an occurrence starting by `done` joins the last MASK
        for start, end in found:
            if growing and start <= done:
                done = max(done, end)
            elif start < safe:
                pieces += (combined[done:start], MASK)
                done, growing = end, True
            else:
                break  # it could still be joined by one starting before it
        if growing and done >= safe and not final:
            self._open = done - safe
        else:
            pieces.append(combined[done:safe])
            self._open = None
        self._carry = combined[safe:]
        return "".join(pieces)


@dataclass(frozen=True)
class Write:
    """One database write of a CappedLog; hand it to written() once it is stored.

    "append" adds data to what is stored; "tail" keeps the first `keep`
    characters stored (the head) and puts data (marker and tail) after them,
    so a capped log's head is sent once, never rewritten from here. The data
    is UTF-8 and sent as it is: decoding megabytes only to encode them again
    would cost time and memory.
    """

    kind: Literal["append", "tail"]
    data: bytes
    mark: int  # CappedLog.total when the write was made
    keep: int = 0

    @property
    def text(self) -> str:
        return self.data.decode()


class CappedLog:
    """One stored output column, capped to its first and last bytes.

    The head shows how a job started and the tail how it ended, which is
    what someone reading a failed build needs; the middle of a runaway job
    is dropped for one marker line saying so. Only about `limit` bytes are
    kept in memory, however much is appended, and a capped log lets go of
    its head once the database has it.
    """

    def __init__(self, limit: int, setting: str = "output_limit"):
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        self.limit = limit
        self.setting = setting
        self.total = 0
        self._head = bytearray()
        self._head_size = 0  # bytes of the head, also once they are let go
        self._head_full = False
        self._head_chars = 0  # PostgreSQL's left() counts characters
        self._head_newline = True  # the head ends a line (or is empty)
        # The tail is the chunks as appended, dropped from the front once the
        # rest still holds the last _tail_cap bytes: nothing is copied.
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        # Grows by the bytes of a character the head had no room for, so
        # that nothing is left out unless more than `limit` was appended.
        self._tail_cap = limit // 2
        self._written = 0
        # Bytes of the head the database has that are no longer held.
        self._forgotten = 0

    def append(self, text: str) -> None:
        # Lone surrogates (undecodable bytes, with surrogateescape) cannot be
        # stored as UTF-8 at all; they become "?".
        data = text.encode("utf-8", "replace")
        self.total += len(data)
        if not self._head_full:
            room = self.limit - self.limit // 2 - self._head_size
            if not self.limit or len(data) <= room:
                self._to_head(data, len(text))
                return
            while data[room] & 0xC0 == 0x80:  # back to the start of a character
                room -= 1
            self._to_head(data[:room], len(data[:room].decode()))
            self._head_full = True
            self._tail_cap = self.limit - self._head_size
            data = data[room:]
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail and self._tail_size - len(self._tail[0]) >= self._tail_cap:
            self._tail_size -= len(self._tail.popleft())

    def _to_head(self, data: bytes, chars: int) -> None:
        if data:
            self._head += data
            self._head_size += len(data)
            self._head_chars += chars
            self._head_newline = data.endswith(b"\n")

    @property
    def truncated(self) -> bool:
        return 0 < self.limit < self.total

    @property
    def left_out(self) -> int:
        """Bytes appended but not stored."""
        if not self.truncated:
            return 0
        return self.total - self._head_size - sum(map(len, self._stored_tail()))

    def text(self) -> str:
        """What is stored; whole only until written() let go of the head."""
        if not self.truncated:
            return (self._head + b"".join(self._tail)).decode()
        return (self._head + self._after_head()).decode()

    def _after_head(self) -> bytes:
        """The marker line and the tail, as stored after the head of a capped log.

        The tail's chunks are joined once: one copy of what is stored.
        """
        parts = self._stored_tail()
        marker = (
            f"{'' if self._head_newline else chr(10)}[... "
            f"{self.total - self._head_size - sum(map(len, parts))} bytes of output left out "
            f"here: the worker's {self.setting} is {format_size(self.limit)} ...]\n"
        )
        return b"".join([marker.encode(), *parts])

    def _stored_tail(self) -> list:
        """The buffers of the tail's last _tail_cap bytes, from a character's start."""
        chunks, size = list(self._tail), self._tail_size
        while chunks and size - len(chunks[0]) >= self._tail_cap:
            size -= len(chunks.pop(0))
        if not chunks:
            return []
        first = memoryview(chunks[0])
        start = max(size - self._tail_cap, 0)
        while start < len(first) and first[start] & 0xC0 == 0x80:
            start += 1
        return [first[start:], *chunks[1:]]

    def pending_head(self) -> int:
        """Bytes of the head, or of an uncapped log, not yet in the database.

        They are held in memory until written: the caller bounds them. The
        tail of a capped log is bounded here, however slow the writes.
        """
        if self.truncated:
            return max(self._head_size - self._written, 0)
        return self.unwritten()

    def stored(self) -> int:
        """Bytes the database has."""
        return self._written

    def unwritten(self) -> int:
        """Bytes appended since the last write that reached the database."""
        return self.total - self._written

    def next_write(self) -> Write | None:
        """What the database needs to catch up, or None if it already has it all.

        Only what is new is sent while nothing is left out. Once the middle
        is dropped, the rest of the head is appended once, and from then on
        each write replaces what follows the head: the marker's count
        changes with every append. Keep one write in flight at a time.
        """
        if self.total == self._written:
            return None
        start = self._written - self._forgotten
        if self.truncated:
            if self._written < self._head_size:
                return Write("append", bytes(memoryview(self._head)[start:]), self._head_size)
            return Write("tail", self._after_head(), self.total, self._head_chars)
        # Nothing left out: head and tail are the stream, back to back.
        tail = b"".join(self._tail)
        if start < len(self._head):
            return Write("append", b"".join((memoryview(self._head)[start:], tail)), self.total)
        return Write("append", tail[start - len(self._head):], self.total)

    def written(self, write: Write) -> None:
        """Confirm that `write` reached the database; until then it is sent again.

        What the database has of the head is let go: it is never sent again
        (once the log is capped, only what follows the head is rewritten).
        """
        self._written = max(self._written, write.mark)
        drop = min(self._written, self._head_size) - self._forgotten
        if drop > 0:
            # A new bytearray: deleting from the front keeps the buffer.
            self._head = self._head[drop:]
            self._forgotten += drop


_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(?: ?(%s))?" % "|".join(_UNITS))


def parse_size(value: int | str) -> int:
    """Read a size in bytes from a config value: 4096, "4096", "512KiB", "8 MB".

    KB, MB and GB are powers of 1000 and KiB, MiB and GiB powers of 1024, as
    their names say, so that a limit means exactly what the operator wrote.
    """
    problem = (
        f"bad size {value!r}: expected a byte count or a number with a unit "
        'B, KB, MB, GB, KiB, MiB or GiB, like "8MiB"'
    )
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, int):
        size = Fraction(value)
    elif isinstance(value, float) and value.is_integer():
        size = Fraction(value)  # 8.0 in TOML is still a whole number of bytes
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        size = Fraction(match[1]) * _UNITS[match[2] or "B"]
    else:
        raise ValueError(problem)
    if size < 0:
        raise ValueError(problem)
    if size.denominator != 1:
        raise ValueError(f"bad size {value!r}: that is {float(size)} bytes, not a whole number")
    return int(size)


# Largest first: the first unit that spells a size exactly is the shortest spelling.
_FORMAT_UNITS = sorted(
    ((factor, unit) for unit, factor in _UNITS.items() if factor > 1), reverse=True
)


def format_size(n: int) -> str:
    """Spell a byte count the way an operator would write it: "8 MiB", "1.5 GiB".

    Exact whenever some unit takes at most two decimals and four digits
    ("1000 KiB", "2 GB", "100 B"), so parse_size() reads the same number back;
    otherwise rounded, since then it is only read by people.
    """
    for factor, unit in _FORMAT_UNITS:
        hundredths, rest = divmod(n * 100, factor)
        if not rest and 100 <= hundredths < 1_000_000:
            whole, fraction = divmod(hundredths, 100)
            number = f"{whole}.{fraction:02d}".rstrip("0") if fraction else str(whole)
            return f"{number} {unit}"
    if n < 10_000:
        return f"{n} B"
    factor, unit = max((f, u) for f, u in _FORMAT_UNITS if u.endswith("iB") and f <= n)
    return f"{n / factor:.1f} {unit}"
