"""Files and batches through the real `openai` client, against a router over fake peers: shapes,
validation, per-line errors, the cap on running lines, cancel, and resuming after a restart."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import router_fakes
from router_fakes import API_KEY, MODEL, Cluster, start_cluster, wait_until

from pdserve.protocol import Abort, GenerateReq
from pdserve.router.data_dir import open_data_dir

CHAT = "/v1/chat/completions"
MAX_RUNNING = 2
MAX_FILE_BYTES = 64 * 1024


def line(custom_id: str, content: str, url: str = CHAT, **body: Any) -> dict[str, Any]:
    if url == CHAT:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    else:
        body = {"model": MODEL, "prompt": content, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(i) + "\n" for i in items).encode()


def client_of(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)


def run_batch(client: openai.OpenAI, items: list[Any], endpoint: str = CHAT) -> Any:
    f = client.files.create(file=("in.jsonl", jsonl(items)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")


def wait_status(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...]) -> Any:
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b, 10.0
    )


def read_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    rows = [json.loads(r) for r in client.files.content(file_id).text.splitlines()]
    by_id = {r["custom_id"]: r for r in rows}
    assert len(by_id) == len(rows), "a line was answered twice"
    return by_id


def batch_reqs(cluster: Cluster) -> list[GenerateReq]:
    return [r for r in cluster.requests() if r.priority < 0]


@pytest.fixture(scope="module")
def batch_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("data")
    c = start_cluster(
        data_dir=str(data_dir), max_running_batch_lines=MAX_RUNNING, max_file_bytes=MAX_FILE_BYTES
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(batch_cluster: Cluster) -> openai.OpenAI:
    return client_of(batch_cluster)


def test_file_upload_list_content_and_delete(client: openai.OpenAI) -> None:
    data = jsonl([line("a", "hi")])
    f = client.files.create(file=("mine.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(data)
    assert f.filename == "mine.jsonl" and f.purpose == "batch" and f.status == "processed"
    assert client.files.retrieve(f.id).bytes == len(data)
    assert client.files.content(f.id).read() == data
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_upload_refuses_other_purposes_and_files_over_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch")
    assert err.value.status_code == 413
    # Above the router's body limit (16 MiB) only the file limit applies: a 413 naming it.
    with pytest.raises(openai.APIStatusError, match="max_file_bytes"):
        client.files.create(file=("big.jsonl", b"x" * (17 * 2**20)), purpose="batch")


def test_chat_batch_answers_good_lines_and_files_bad_ones(
    client: openai.OpenAI, batch_cluster: Cluster
) -> None:
    items = [line(f"ok-{i}", f"hello {i}", max_tokens=5) for i in range(5)]
    items += [
        line("bad-temperature", "x", temperature="hot"),
        line("too-long", "TOO_LONG"),
        line("other-model", "x", model="gpt-4"),
        line("streamed", "x", stream=True),
    ]
    batch = run_batch(client, items)
    assert batch.id.startswith("batch_") and batch.status == "validating"
    done = wait_status(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed) == (9, 5)
    assert done.request_counts.failed == 4
    assert done.in_progress_at and done.completed_at and done.expires_at > done.created_at
    outputs = read_lines(client, done.output_file_id)
    assert sorted(outputs) == [f"ok-{i}" for i in range(5)]
    response = outputs["ok-0"]["response"]
    assert response["status_code"] == 200 and outputs["ok-0"]["error"] is None
    assert response["body"]["object"] == "chat.completion"
    assert response["body"]["choices"][0]["message"]["content"] == "Hello world!"
    assert response["request_id"] == response["body"]["id"]
    errors = read_lines(client, done.error_file_id)
    assert sorted(errors) == ["bad-temperature", "other-model", "streamed", "too-long"]
    for custom_id, param in [("bad-temperature", "temperature"), ("other-model", "model")]:
        assert errors[custom_id]["response"]["status_code"] == 400
        assert errors[custom_id]["response"]["body"]["error"]["param"] == param
    assert "9000 tokens" in errors["too-long"]["response"]["body"]["error"]["message"]
    assert {r.priority for r in batch_reqs(batch_cluster)} == {-1}


def test_completions_batch_uses_the_completions_shape(client: openai.OpenAI) -> None:
    url = "/v1/completions"
    batch = run_batch(
        client, [line(f"c{i}", "once upon", url, max_tokens=2) for i in range(3)], url
    )
    done = wait_status(client, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.request_counts.completed == 3
    body = read_lines(client, done.output_file_id)["c1"]["response"]["body"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == "length"
    assert done.error_file_id is None


def test_a_malformed_file_fails_the_batch_with_openai_errors(client: openai.OpenAI) -> None:
    good = line("a", "hi")
    items = [
        good,
        "not json",
        {"method": "POST", "url": CHAT, "body": {}},
        {**line("b", "hi"), "url": "/v1/completions"},
        {**line("c", "hi"), "method": "GET"},
        good,
    ]
    raw = jsonl(items[:1]) + b"{not json\n" + jsonl(items[2:])
    f = client.files.create(file=("bad.jsonl", raw), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    done = wait_status(client, batch.id, ("failed", "completed"))
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    found = [(e.line, e.code) for e in done.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "mismatched_url"),
        (5, "invalid_method"),
        (6, "duplicate_custom_id"),
    ]


def test_create_batch_refuses_what_it_cannot_run(client: openai.OpenAI) -> None:
    f = client.files.create(file=("in.jsonl", jsonl([line("a", "hi")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                              completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_list_batches_pages_newest_first(client: openai.OpenAI) -> None:
    ids = [run_batch(client, [line("a", "hi", max_tokens=1)]).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    after = client.batches.list(limit=2, after=ids[1])
    assert after.data[0].id == ids[0]
    for batch_id in ids:
        wait_status(client, batch_id, ("completed",))


def test_running_lines_are_capped_and_cancel_keeps_answered_ones(
    client: openai.OpenAI, batch_cluster: Cluster
) -> None:
    items = [line(f"ok-{i}", "hi", max_tokens=3) for i in range(3)]
    items += [line(f"hang-{i}", f"HANG {i}") for i in range(4)]
    batch = run_batch(client, items)
    hanging = lambda: [r for r in batch_reqs(batch_cluster) if "HANG" in str(r.messages)]  # noqa: E731
    wait_until(lambda: len(hanging()) == MAX_RUNNING)
    time.sleep(0.3)
    assert len(hanging()) == MAX_RUNNING, "more batch lines ran than max_running_batch_lines"
    assert client.batches.retrieve(batch.id).request_counts.completed == 3
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_status(client, batch.id, ("cancelled",))
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    assert sorted(read_lines(client, done.output_file_id)) == ["ok-0", "ok-1", "ok-2"]
    assert len(hanging()) == MAX_RUNNING  # the queued lines never ran
    aborted = {m.rid for t in batch_cluster.tokenizers for m in t.of_type(Abort)}
    assert all(r.rid in aborted for r in hanging())
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(run_completed_batch(client))


def run_completed_batch(client: openai.OpenAI) -> str:
    batch = run_batch(client, [line("a", "hi", max_tokens=1)])
    return wait_status(client, batch.id, ("completed",)).id


def test_a_restart_resumes_only_the_unanswered_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two lines answered, two hanging when the router stops; the next router on the same data
    dir answers just those two (and cuts a half-written answer off the output file), as soon as
    the previous router has let the data dir go."""
    first = start_cluster(data_dir=str(tmp_path), max_running_batch_lines=1)
    try:
        c = client_of(first)
        items = [line(f"ok-{i}", "hi", max_tokens=3) for i in range(2)]
        items += [line(f"hang-{i}", f"HANG {i}") for i in range(2)]
        batch_id = run_batch(c, items).id
        wait_until(lambda: c.batches.retrieve(batch_id).request_counts.completed == 2)
    finally:
        first.stop()
    db = sqlite3.connect(tmp_path / "pdserve.sqlite")
    (out_file_id,) = db.execute(
        "SELECT out_file_id FROM batches WHERE id = ?", (batch_id,)
    ).fetchone()
    db.close()
    with (tmp_path / "files" / out_file_id).open("ab") as f:
        f.write(b'{"id": "batch_req_half", "custom_id": "hang-0", "resp')  # a crash mid-write

    original = router_fakes.script
    monkeypatch.setattr(router_fakes, "script", lambda req: original(_without(req, "HANG")))
    previous_router = open_data_dir(tmp_path)  # still letting the data dir go
    second = start_cluster(data_dir=str(tmp_path), max_running_batch_lines=1)
    try:
        time.sleep(0.3)
        assert not batch_reqs(second)
        previous_router.close()
        wait_until(lambda: len(batch_reqs(second)) == 2)  # resumed without any client call
        c = client_of(second)
        done = wait_status(c, batch_id, ("completed",))
        assert (done.request_counts.total, done.request_counts.completed) == (4, 4)
        assert sorted(read_lines(c, done.output_file_id)) == ["hang-0", "hang-1", "ok-0", "ok-1"]
        assert len(batch_reqs(second)) == 2  # only the unanswered lines ran again
    finally:
        second.stop()


def _without(req: GenerateReq, word: str) -> GenerateReq:
    messages = [{**m, "content": m["content"].replace(word, "")} for m in req.messages or []]
    return GenerateReq(**{**req.__dict__, "messages": messages})


def test_batch_routes_need_the_api_key(batch_cluster: Cluster) -> None:
    assert httpx.get(f"{batch_cluster.url}/v1/batches", timeout=5).status_code == 401
    assert httpx.get(f"{batch_cluster.url}/v1/files", timeout=5).status_code == 401
