"""The one address parser: every form PostgreSQL, Redis, SMTP and ssh hosts accept."""

from __future__ import annotations

import pytest

from djinn_worker.config import Address, parse_addr


@pytest.mark.parametrize("addr, unix, expected", [
    ("db.example.com:5433", False, Address("db.example.com", 5433)),
    ("db.example.com", False, Address("db.example.com", 1000)),
    ("127.0.0.1:6380", False, Address("127.0.0.1", 6380)),
    ("127.0.0.1", False, Address("127.0.0.1", 1000)),
    ("[::1]:5433", False, Address("::1", 5433)),
    ("[::1]", False, Address("::1", 1000)),
    ("::1", False, Address("::1", 1000)),
    ("fe80::1:2", False, Address("fe80::1:2", 1000)),
    ("[2001:db8::7]:65535", False, Address("2001:db8::7", 65535)),
    ("localhost:1", False, Address("localhost", 1)),
    ("/var/run/postgresql", True, Address("/var/run/postgresql", 1000)),
    ("/run/redis/redis.sock", True, Address("/run/redis/redis.sock", 1000)),
])
def test_good_addresses(addr, unix, expected):
    assert parse_addr(addr, 1000, unix=unix) == expected
    assert parse_addr(addr, 1000, unix=unix).unix == addr.startswith("/")


@pytest.mark.parametrize("addr, unix, problem", [
    ("", False, "expected host:port"),
    ("host:abc", False, "port must be a number"),
    ("host:", False, "port must be a number"),
    ("host:0", False, "port must be a number from 1 to 65535"),
    ("host:65536", False, "port must be a number from 1 to 65535"),
    ("host:-1", False, "port must be a number"),
    ("host:٣", False, "port must be a number"),
    (":5432", False, "host is missing"),
    ("[::1", False, "expected [IPv6 address]:port"),
    ("[::1]5432", False, "expected [IPv6 address]:port"),
    ("[::1]:", False, "port must be a number"),
    ("[]:5432", False, "expected [IPv6 address]:port"),
    ("[db]:5432", False, "expected [IPv6 address]:port"),
    ("db host:5432", False, "expected host:port"),
    (" db:5432", False, "expected host:port"),
    ("/var/run/postgresql", False, "unix socket is not supported here"),
])
def test_bad_addresses(addr, unix, problem):
    with pytest.raises(ValueError) as err:
        parse_addr(addr, 1000, unix=unix)
    assert problem in str(err.value)
    assert repr(addr) in str(err.value)
