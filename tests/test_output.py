"""Masking, capping and size parsing of build output, checked against references.

The references below compute the expected result from the whole input at
once, in the most obvious (slow) way, so the streaming code is compared with
something that has no chunk boundaries to get wrong.
"""

from __future__ import annotations

import random
import re

import pytest

from djinn_worker.output import (
    MASK,
    MIN_MASKED,
    CappedLog,
    Masker,
    Write,
    format_size,
    parse_size,
)


def reference_mask(text: str, values: list[str]) -> str:
    """Mark every character inside an occurrence; each run of marks is one MASK."""
    values = [v for v in set(values) if len(v) >= MIN_MASKED]
    covered = [False] * len(text)
    for i in range(len(text)):
        for value in values:
            if text.startswith(value, i):
                covered[i:i + len(value)] = [True] * len(value)
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = [rng.randint(0, len(text)) for _ in range(rng.randint(0, 8))]
    return split(text, cuts)


def stream(masker: Masker, chunks: list[str]) -> str:
    return "".join(masker.feed(chunk) for chunk in chunks) + masker.flush()


def mask_every_split(text: str, values: list[str]) -> set[str]:
    """The results of masking `text` cut at every pair of places."""
    results = set()
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            results.add(stream(Masker(values), split(text, [i, j])))
    return results


# --- Masker -----------------------------------------------------------------


def test_nothing_to_mask_passes_text_through_untouched():
    masker = Masker([])
    assert not masker and not masker.active
    text = "some output " * 10
    assert masker.feed(text) is text
    assert masker.flush() == ""


def test_short_and_empty_values_are_not_masked_but_counted():
    masker = Masker(["abc", "abc", "", "12345", "secret"])
    assert masker.short == 2  # "abc" once, "12345"; "" hides nothing
    assert masker.active
    assert stream(masker, ["abc 12345 secret"]) == f"abc 12345 {MASK}"


def test_only_short_values_leave_the_masker_inactive():
    masker = Masker(["abc", "12345"])
    assert not masker and masker.short == 2
    assert masker.feed("abc") == "abc"


@pytest.mark.parametrize(
    "text, values, expected",
    [
        ("secret", ["secret"], MASK),
        ("secret at the start", ["secret"], f"{MASK} at the start"),
        ("at the end: secret", ["secret"], f"at the end: {MASK}"),
        ("secretsecret", ["secret"], MASK),
        ("secretsecret secret", ["secret"], f"{MASK} {MASK}"),
        ("abcdefghijkl", ["abcdefgh", "efghijkl"], MASK),
        ("--abcdefghijkl--", ["abcdefgh", "efghijkl"], f"--{MASK}--"),
        ("my-secret-value and secret", ["secret", "my-secret-value"], f"{MASK} and {MASK}"),
        ("aaaaaaaaaa", ["aaaaaa"], MASK),
        ("aaaaa", ["aaaaaa"], "aaaaa"),
        ("a secre", ["secret"], "a secre"),
        ("secre", ["secret"], "secre"),
        ("passwördé!", ["wördé!"], f"pass{MASK}"),
        ("😀😀😀😀😀😀😀", ["😀😀😀😀😀😀"], MASK),
        ("", ["secret"], ""),
    ],
)
def test_masks_the_same_whatever_the_chunking(text, values, expected):
    assert reference_mask(text, values) == expected
    assert mask_every_split(text, values) == {expected}


def test_occurrence_completed_after_an_emitted_one_joins_its_mask():
    # "abcdefgh" is complete before "l" arrives, but "efghijkl" overlaps it.
    masker = Masker(["abcdefgh", "efghijkl"])
    assert masker.feed("abcdefghijk") + masker.feed("l") + masker.flush() == MASK
    masker = Masker(["secret"])
    assert masker.feed("xsecret") + masker.feed("secret") + masker.flush() == "x" + MASK


def test_a_value_split_at_every_boundary_never_leaks():
    value = "hunter2-password"
    text = f"login: {value}\nok {value}"
    for i in range(len(text) + 1):
        out = stream(Masker([value]), [text[:i], text[i:]])
        assert out == f"login: {MASK}\nok {MASK}"


def test_a_value_fed_one_character_at_a_time():
    value = "correct-horse"
    text = f"{value}.{value}{value}:{value}"
    assert stream(Masker([value]), list(text)) == f"{MASK}.{MASK}:{MASK}"


def test_holds_back_no_more_than_the_longest_value_needs():
    masker = Masker(["secret", "longer-secret"])  # 13 characters: holds back 12
    out = masker.feed("a" * 100)
    assert out == "a" * 88
    assert masker.feed("b") == "a"
    assert masker.flush() == "a" * 11 + "b"


def test_a_prefix_at_the_end_is_emitted_unchanged_by_flush():
    masker = Masker(["secret"])
    out = masker.feed("the word secre")
    assert "secre" not in out
    assert out + masker.flush() == "the word secre"


def test_the_masker_starts_afresh_after_flush():
    masker = Masker(["secret"])
    assert masker.feed("secr") + masker.flush() == "secr"
    assert masker.feed("et") + masker.flush() == "et"
    assert stream(masker, ["sec", "ret"]) == MASK


def test_empty_chunks_change_nothing():
    masker = Masker(["secret"])
    assert stream(masker, ["", "sec", "", "", "ret", ""]) == MASK


def test_random_streams_match_masking_all_at_once():
    rng = random.Random(20240611)
    for _ in range(1500):
        alphabet = rng.choice(["ab", "abc", "ab\n", "aé€😀"])
        values = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
            for _ in range(rng.randint(1, 4))
        ]
        parts = [rng.choice(values) if rng.random() < 0.4 else rng.choice(alphabet)
                 for _ in range(rng.randint(0, 30))]
        text = "".join(parts)
        expected = reference_mask(text, values)
        out = stream(Masker(values), random_chunks(rng, text))
        assert out == expected, (text, values)
        for value in values:
            if len(value) >= MIN_MASKED:
                assert value not in out


def test_random_streams_fed_in_single_characters():
    rng = random.Random(7)
    for _ in range(300):
        values = ["".join(rng.choice("ab") for _ in range(rng.randint(6, 9))) for _ in range(2)]
        text = "".join(rng.choice(["a", "b", *values]) for _ in range(rng.randint(0, 15)))
        assert stream(Masker(values), list(text)) == reference_mask(text, values)


# --- CappedLog ----------------------------------------------------------------

MARKER = re.compile(
    r"\n?\[\.\.\. (\d+) bytes of output left out here: the worker's (\S+) is ([^.]+) \.\.\.\]\n"
)


def reference_log(text: str, limit: int) -> tuple[str, str, int]:
    """The stored head and tail and the bytes left out, from the whole input at once."""
    data = text.encode()
    if not limit or len(data) <= limit:
        return text, "", 0
    cut = limit - limit // 2
    while data[cut] & 0xC0 == 0x80:
        cut -= 1
    head = data[:cut]
    tail = data[len(data) - (limit - cut):]
    while tail and tail[0] & 0xC0 == 0x80:
        tail = tail[1:]
    return head.decode(), tail.decode(), len(data) - len(head) - len(tail)


def fill(limit: int, chunks: list[str], setting: str = "output_limit") -> CappedLog:
    log = CappedLog(limit, setting)
    for chunk in chunks:
        log.append(chunk)
    return log


def test_short_output_is_stored_whole():
    log = fill(100, ["hello ", "world\n"])
    assert log.text() == "hello world\n"
    assert not log.truncated and log.left_out == 0 and log.total == 12


def test_output_of_exactly_the_limit_is_stored_whole():
    log = fill(10, ["01234", "56789"])
    assert log.text() == "0123456789" and not log.truncated


def test_long_output_keeps_head_and_tail_around_one_marker():
    log = fill(10, ["0123456789", "abcdef"])
    assert log.text() == (
        "01234\n[... 6 bytes of output left out here: "
        "the worker's output_limit is 10 B ...]\nbcdef"
    )
    assert log.truncated and log.left_out == 6 and log.total == 16


def test_the_marker_follows_a_head_ending_in_a_newline_directly():
    log = fill(10, ["line\n", "x" * 100])  # the head holds 5 bytes
    assert log.text().startswith("line\n[... ")


def test_the_marker_names_the_setting_and_its_value():
    log = fill(8 * 2**20, ["x" * (9 * 2**20)], setting="log_limit")
    (match,) = MARKER.finditer(log.text())
    assert match.groups() == (str(2**20), "log_limit", "8 MiB")
    assert match[0] == (
        "\n[... 1048576 bytes of output left out here: "
        "the worker's log_limit is 8 MiB ...]\n"
    )


def test_a_character_that_does_not_fit_the_head_goes_to_the_tail():
    log = fill(8, ["abc€"])  # 6 bytes, the head has room for 4: "€" starts at 3
    assert log.text() == "abc€" and not log.truncated
    log.append("d")
    assert log.text() == "abc€d"
    log.append("e")
    assert log.text() == "abc€de"  # 8 bytes: all of it fits
    log.append("f")
    assert log.text().startswith("abc\n[... 3 bytes") and log.text().endswith("]\ndef")


def test_a_tail_starting_inside_a_character_skips_to_the_next():
    log = fill(6, ["abc", "😀😀"])  # the tail's last 3 bytes are the end of "😀"
    assert log.text().endswith("]\n")
    assert log.left_out == 8


def test_limit_zero_stores_everything():
    log = CappedLog(0)
    for _ in range(1000):
        log.append("x" * 1000 + "é\n")
    assert log.text() == ("x" * 1000 + "é\n") * 1000
    assert not log.truncated and log.left_out == 0


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError):
        CappedLog(-1)


def test_memory_stays_near_the_limit():
    log = CappedLog(1000)
    for _ in range(5000):
        log.append("y" * 997 + "€")
        # The head's share, plus the tail and at most the chunk it starts in.
        assert len(log._head) + log._tail_size <= 500 + 503 + 1000
    assert log.left_out == log.total - len(log.text().encode()) + len(MARKER.search(log.text())[0])


def test_random_appends_match_capping_all_at_once():
    rng = random.Random(99)
    pieces = ["a", "b", "\n", "é", "€", "😀", "line\n"]
    for _ in range(2000):
        limit = rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 13, 20, 50, rng.randint(1, 200)])
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        log = fill(limit, random_chunks(rng, text))
        head, tail, left_out = reference_log(text, limit)
        stored = log.text()
        assert log.left_out == left_out
        assert log.total == len(text.encode())
        assert log.truncated == (left_out > 0)
        if not log.truncated:
            assert stored == text
            continue
        assert stored.startswith(head) and stored.endswith(tail), (text, limit)
        marker = stored[len(head):len(stored) - len(tail)]
        match = MARKER.fullmatch(marker)
        assert match and int(match[1]) == left_out
        assert marker.startswith("\n") == (head != "" and not head.endswith("\n"))
        assert len(stored.encode()) <= limit + len(marker.encode())


def test_left_out_grows_but_there_is_only_ever_one_marker():
    log = CappedLog(64)
    for i in range(2000):
        log.append(f"line {i} é€😀\n")
        if log.truncated:
            assert len(MARKER.findall(log.text())) == 1
    assert log.text().endswith("line 1999 é€😀\n")


# --- CappedLog: incremental writes --------------------------------------------


def apply(db: str, write: Write) -> str:
    return db + write.text if write.kind == "append" else db[:write.keep] + write.text


def test_writes_send_only_what_is_new_until_truncated():
    log = CappedLog(20)
    assert log.next_write() is None
    log.append("hello ")
    write = log.next_write()
    assert (write.kind, write.text) == ("append", "hello ")
    assert log.unwritten() == 6
    log.written(write)
    assert log.unwritten() == 0 and log.next_write() is None
    log.append("world")
    assert log.next_write().text == "world"


def test_a_failed_write_comes_back_with_what_was_appended_since():
    log = CappedLog(100)
    log.append("one ")
    log.next_write()  # lost: written() is never called
    log.append("two")
    write = log.next_write()
    assert (write.kind, write.text) == ("append", "one two")


def test_appends_during_a_write_are_sent_next():
    log = CappedLog(100)
    log.append("one ")
    write = log.next_write()
    log.append("two")
    log.written(write)
    assert log.unwritten() == 3
    assert log.next_write().text == "two"


def test_truncation_after_confirmed_appends_rewrites_what_follows_the_head():
    log = CappedLog(10)
    log.append("0123")
    write = log.next_write()
    db = apply("", write)
    log.written(write)
    log.append("456789abcdef")
    capped = expected(log, ["0123456789abcdef"])
    write = log.next_write()
    assert (write.kind, write.text) == ("append", "4")  # the rest of the head, once
    db = apply(db, write)
    log.written(write)
    write = log.next_write()
    assert write.kind == "tail" and write.keep == 5
    assert write.text == capped[5:] and "left out" in write.text
    db = apply(db, write)
    log.written(write)
    assert db == capped and log.next_write() is None
    log.append("more")
    write = log.next_write()
    assert write.kind == "tail" and apply(db, write) == expected(log, ["0123456789abcdefmore"])


def test_truncation_during_a_write_ends_with_the_stored_text():
    log = CappedLog(10)
    log.append("0123")
    write = log.next_write()
    log.append("456789abcdef")
    db = apply("", write)
    log.written(write)
    while (write := log.next_write()) is not None:
        db = apply(db, write)
        log.written(write)
    assert db == expected(log, ["0123456789abcdef"])


def test_the_head_keeps_whole_characters_and_counts_them():
    log = CappedLog(12)
    log.append("€€€" + "x" * 20)  # the head's 6 bytes hold two of the three
    while (write := log.next_write()) is not None and write.kind == "append":
        log.written(write)
    assert write.keep == 2


def test_a_stale_confirmation_does_not_undo_a_newer_one():
    log = CappedLog(100)
    log.append("a")
    old = log.next_write()
    log.append("b")
    new = log.next_write()
    log.written(new)
    log.written(old)
    assert log.next_write() is None


def expected(log: CappedLog, full: list[str]) -> str:
    """What the database should hold: the stream capped at once, by a log
    that made no writes (a log lets go of its head once it is stored)."""
    reference = CappedLog(log.limit)
    reference.append("".join(full))
    return reference.text()


def test_random_writes_with_failures_end_with_the_stored_text():
    rng = random.Random(4242)
    pieces = ["a", "\n", "é", "€", "😀", "output line\n"]
    for _ in range(1000):
        limit = rng.choice([0, 1, 5, 16, 40, rng.randint(1, 300)])
        log, db, full = CappedLog(limit), "", []
        kinds = []
        for _ in range(rng.randint(0, 40)):
            full.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))))
            log.append(full[-1])
            if rng.random() < 0.5:
                continue
            write = log.next_write()
            if write is None:
                assert log.unwritten() == 0 and db == expected(log, full)
                continue
            kinds.append(write.kind)
            for _ in range(rng.choice([0, 0, 1, 2])):  # appended while the write is in flight
                full.append(rng.choice(pieces))
                log.append(full[-1])
            if rng.random() < 0.75:
                db = apply(db, write)
                log.written(write)
            # else the database write failed: nothing is stored, nothing confirmed
        while (write := log.next_write()) is not None:
            kinds.append(write.kind)
            db = apply(db, write)
            log.written(write)
        assert db == expected(log, full)
        assert log.unwritten() == 0
        # Once the middle is dropped, every write rewrites what follows the head.
        assert kinds == sorted(kinds)  # "append" < "tail"
        if limit == 0:
            assert "tail" not in kinds


# --- parse_size / format_size -------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        ("0", 0),
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("4096 B", 4096),
        ("512KiB", 512 * 1024),
        ("8MiB", 8 * 2**20),
        ("8 MiB", 8 * 2**20),
        ("1GiB", 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2TiB", 2 * 2**40),
        ("1KB", 1000),
        ("8MB", 8_000_000),
        ("8 MB", 8_000_000),
        ("1.5 KB", 1500),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("0.5KiB", 512),
        (8.0, 8),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        -1, "-1", "-1MiB", True, False, 1.5, float("inf"), float("nan"), None, "", " ",
        "8 MB!", "8mib", "8 mb", "8M", "8 Mi", "8  MiB", " 8MiB", "8MiB ", "MiB", "1e6",
        "0x10", "1,000", "1.", ".5MiB", "0.5B", "1.1GiB", "8 PiB", "٣",
    ],
)
def test_parse_size_refuses(value):
    with pytest.raises(ValueError, match=r"^bad size "):
        parse_size(value)


def test_parse_size_error_message():
    with pytest.raises(ValueError) as error:
        parse_size("8 MB!")
    assert str(error.value) == (
        "bad size '8 MB!': expected a byte count or a number with a unit "
        'B, KB, MB, GB, KiB, MiB or GiB, like "8MiB"'
    )
    with pytest.raises(ValueError, match="not a whole number"):
        parse_size("0.5B")


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (1, "1 B"),
        (100, "100 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (512 * 1024, "512 KiB"),
        (1000 * 1024, "1000 KiB"),
        (8 * 2**20, "8 MiB"),
        (3 * 2**29, "1.5 GiB"),
        (5 * 2**28, "1.25 GiB"),
        (2**40, "1 TiB"),
        (1000, "1 KB"),
        (8_000_000, "8 MB"),
        (2 * 10**9, "2 GB"),
        (123_456_789, "117.7 MiB"),
        (12_345, "12.1 KiB"),
    ],
)
def test_format_size(n, expected):
    assert format_size(n) == expected


@pytest.mark.parametrize(
    "text",
    ["100 B", "4 KiB", "512 KiB", "8 MiB", "64 MiB", "1 GiB", "1.5 GiB",
     "1 KB", "8 MB", "2 GB", "1 TiB"],
)
def test_format_and_parse_round_trip(text):
    assert format_size(parse_size(text)) == text
    assert format_size(parse_size(text.replace(" ", ""))) == text


def test_format_size_is_exact_for_round_numbers_and_close_for_others():
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    rng = random.Random(5)
    for _ in range(3000):
        round_number = rng.randint(1, 9999) * rng.choice(list(factors.values()))
        assert parse_size(format_size(round_number)) == round_number
        n = rng.randint(0, 2**34)
        number, unit = format_size(n).split(" ")
        assert abs(float(number) * factors[unit] - n) <= 0.05 * factors[unit]


def test_without_a_limit_written_text_leaves_memory():
    log = CappedLog(0)
    for _ in range(100):
        log.append("z" * 10000)
        log.written(log.next_write())
    assert len(log._head) == 0 and log.unwritten() == 0
    log.append("end")
    assert log.next_write().text == "end"
