"""End to end through the real worker process with the os driver."""

import pytest


@pytest.mark.parametrize("schema", ["dist", "original"], indirect=True)
def test_passing_build(server, make_worker):
    make_worker()
    build = server.queue_build([("test", False, [("hello", "echo hello world")])])
    row = server.wait(build.id)
    assert row["status"] == "passed", row["output"]
    assert row["started_at"] and row["finished_at"]
    job = server.job(build.jobs["hello"])
    assert job["status"] == "passed"
    assert "hello world" in job["output"]
    assert row["output"].endswith("Done. Run passed\n")
