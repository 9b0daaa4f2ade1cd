"""The data dir, file and batch stores, and the input file check, without a router."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.router.batch_input import check_input, iter_input
from pdserve.router.batch_runner import ResultFiles
from pdserve.router.batch_store import BatchStore
from pdserve.router.data_dir import DataDir, DataDirError, open_data_dir
from pdserve.router.file_store import FileStore

CHAT = "/v1/chat/completions"


@pytest.fixture
def data(tmp_path: Path) -> Iterator[DataDir]:
    d = open_data_dir(tmp_path / "data")
    yield d
    d.close()


def test_a_second_router_cannot_open_a_data_dir_in_use(data: DataDir) -> None:
    with pytest.raises(DataDirError, match="in use by another pdserve router"):
        open_data_dir(data.root)


def test_the_lock_is_released_on_close_and_the_database_kept(tmp_path: Path) -> None:
    first = open_data_dir(tmp_path)
    (tmp_path / "files" / "f").write_bytes(b"abc")
    FileStore(first).add("f", "f.jsonl", "batch")
    first.close()
    second = open_data_dir(tmp_path)
    assert FileStore(second).get("f").bytes == 3
    second.close()


def test_files_list_pages_by_purpose_and_order(data: DataDir) -> None:
    store = FileStore(data)
    for i in range(5):
        store.path(f"f{i}").write_bytes(b"x" * i)
        store.add(f"f{i}", f"{i}.jsonl", "batch" if i % 2 == 0 else "batch_output")
    page, has_more = store.list(limit=2)
    assert [r.id for r in page] == ["f4", "f3"] and has_more
    page, has_more = store.list(after="f3", limit=10)
    assert [r.id for r in page] == ["f2", "f1", "f0"] and not has_more
    page, _ = store.list(purpose="batch", order="asc")
    assert [r.id for r in page] == ["f0", "f2", "f4"]
    with pytest.raises(ValueError, match="no such file"):
        store.list(after="nope")
    assert store.delete("f0") and not store.path("f0").exists() and not store.delete("f0")


def test_recorded_lines_count_and_survive_a_reopen(tmp_path: Path) -> None:
    data = open_data_dir(tmp_path)
    batch = BatchStore(data).create(CHAT, "file-in", "24h", {"k": "v"})
    assert batch.status == "validating" and batch.to_api()["metadata"] == {"k": "v"}
    BatchStore(data).record_line(batch.id, 1, False, 10)
    BatchStore(data).record_line(batch.id, 3, True, 7)
    data.close()
    data = open_data_dir(tmp_path)
    store = BatchStore(data)
    assert store.done_lines(batch.id) == {1, 3}
    counts = store.get(batch.id).to_api()["request_counts"]
    assert counts == {"total": 0, "completed": 1, "failed": 1}
    assert [b.id for b in store.active()] == [batch.id]
    data.close()


def test_reconcile_cuts_unrecorded_bytes_and_forgets_lines_past_the_file(
    data: DataDir, tmp_path: Path
) -> None:
    store = BatchStore(data)
    batch = store.create(CHAT, "file-in", "24h", None)
    out, err = tmp_path / "out", tmp_path / "err"
    out.write_bytes(b"line1\nline2\nhalf-writ")  # two recorded lines, then a crash mid-write
    err.write_bytes(b"e1\n")  # the error line recorded at 3 and at 6: the file lost the second
    store.record_line(batch.id, 1, False, 6)
    store.record_line(batch.id, 2, False, 12)
    store.record_line(batch.id, 3, True, 3)
    store.record_line(batch.id, 4, True, 6)
    offsets = store.reconcile(batch.id, out.stat().st_size, err.stat().st_size)
    assert offsets == (12, 3)
    assert store.done_lines(batch.id) == {1, 2, 3}  # line 4 runs again
    assert (store.get(batch.id).num_completed, store.get(batch.id).num_failed) == (2, 1)
    results = ResultFiles(out, err, offsets)
    assert results.append(False, b"line5\n") == 18
    results.close()
    assert out.read_bytes() == b"line1\nline2\nline5\n"


def _write(path: Path, items: list[object]) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_check_input_counts_good_lines_and_skips_blank_ones(tmp_path: Path) -> None:
    good = [{"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {}} for i in range(3)]
    path = _write(tmp_path / "in.jsonl", [good[0], "", good[1], "   ", good[2]])
    assert check_input(path, CHAT) == (3, [])
    assert [(x.line, x.custom_id) for x in iter_input(path, CHAT)] == [
        (1, "r0"),
        (3, "r1"),
        (5, "r2"),
    ]


def test_check_input_reports_each_malformed_line(tmp_path: Path) -> None:
    ok = {"custom_id": "a", "method": "POST", "url": CHAT, "body": {}}
    items = [ok, [1, 2], {**ok, "custom_id": ""}, {**ok, "custom_id": "b", "body": "hi"}, ok]
    check = check_input(_write(tmp_path / "in.jsonl", items), CHAT)
    assert check.num_lines == 1
    codes = [(e["line"], e["code"]) for e in check.errors]
    assert codes == [
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "invalid_body"),
        (5, "duplicate_custom_id"),
    ]
    empty = check_input(_write(tmp_path / "empty.jsonl", [""]), CHAT)
    assert [e["code"] for e in empty.errors] == ["empty_file"]
    too_many = check_input(_write(tmp_path / "many.jsonl", [ok]), CHAT, max_lines=0)
    assert [e["code"] for e in too_many.errors] == ["too_many_requests"]
