"""The Responses API end to end with the openai SDK: real gateway replicas, workers and redis-server.

The worker runs a tiny random model (greedy output is deterministic, so a background response, a
foreground one and a resumed stream can be compared text for text) with one slot, so a second response
waits in the queue while a first one runs. Tests that start long responses cancel or finish them.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
import redis
from pydantic import BaseModel, Field

from producer.protocol import EventType, Keys
from producer.webhooks.signing import new_secret
from tests.producer.gateway.webhook_receiver import Receiver
from tests.queue_helpers import WorkerProcess, read_events, wait_for
from tests.stack_helpers import GatewayProcess, Stack, start_stack

pytestmark = pytest.mark.slow
PROMPT = {"model": "tiny", "input": "Name a colour.", "instructions": "Be brief."}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 24}
# long enough to still be running when a test acts on it (the model's context is 1,024 positions)
LONG: dict[str, Any] = {"temperature": 0, "max_output_tokens": 900, "extra_body": {"ignore_eos": True}}
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("responses-stack"), ("--max-num-seqs", "1"), model_dir=tiny_llama)
    yield running
    running.close()


@pytest.fixture(scope="module")
def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A second gateway on the same Redis: it shares nothing with the first but Redis."""
    gateway = GatewayProcess(stack.redis.url, tmp_path_factory.mktemp("replica") / "gateway.log").wait_ready()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def keyed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with two API keys and a two-second retention."""
    log = tmp_path_factory.mktemp("keyed") / "gateway.log"
    gateway = GatewayProcess(
        stack.redis.url, log, "--response-retention-s", "2", env={"TOKENRELAY_API_KEYS": "key-a,key-b"}
    ).wait_ready()
    yield gateway
    gateway.stop()


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return _client(stack.gateway.url)


def _until(client: openai.OpenAI, response_id: str, statuses: tuple[str, ...], timeout: float = 120) -> Any:
    def reached() -> Any:
        response = client.responses.retrieve(response_id)
        return response if response.status in statuses else None

    return wait_for(reached, timeout, 0.05, f"{response_id} to be {statuses}")


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Events of a raw SSE body, one per `data:` line."""
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def _deltas(events: list[Any]) -> str:
    return "".join(_get(e, "delta") for e in events if _get(e, "type") == "response.output_text.delta")


def _get(event: Any, name: str) -> Any:
    return event[name] if isinstance(event, dict) else getattr(event, name)


def test_background_create_then_poll_equals_the_foreground_answer(client: openai.OpenAI) -> None:
    foreground = client.responses.create(**PROMPT, **GREEDY)
    assert foreground.status in ("completed", "incomplete") and foreground.id.startswith("resp_")
    assert foreground.object == "response" and foreground.output[0].type == "message"
    background = client.responses.create(**PROMPT, **GREEDY, background=True, metadata={"job": "7"})
    assert background.status == "queued" and background.background and background.metadata == {"job": "7"}
    done = _until(client, background.id, TERMINAL)
    assert done.status == foreground.status and done.output_text == foreground.output_text
    assert done.usage is not None and foreground.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (
        foreground.usage.input_tokens,
        foreground.usage.output_tokens,
    )
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=24,
        temperature=0,
    )
    assert chat.choices[0].message.content == foreground.output_text  # the same prompt reached the model
    items = client.responses.input_items.list(background.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "Name a colour.")]  # type: ignore[union-attr]


def test_a_stream_dropped_after_n_events_resumes_on_another_replica(stack: Stack, replica: GatewayProcess) -> None:
    body = {**PROMPT, "temperature": 0, "max_output_tokens": 60, "ignore_eos": True, "background": True, "stream": True}
    first: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.gateway.url}/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for event in _sse(response.iter_lines()):
            first.append(event)
            if len(first) == 8:
                break  # the connection drops here; a background response goes on
    response_id = first[0]["response"]["id"]
    last = first[-1]["sequence_number"]
    assert [e["sequence_number"] for e in first] == list(range(8))
    other = _client(replica.url)
    rest = list(other.responses.retrieve(response_id, stream=True, starting_after=last))
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1].type == "response.incomplete"  # ignore_eos: it ran to max_output_tokens
    final = other.responses.retrieve(response_id)
    assert _deltas(first) + _deltas(rest) == final.output_text and final.output_text
    # the whole sequence again, from either replica, is the same events
    whole = [e.model_dump(exclude_unset=True) for e in other.responses.retrieve(response_id, stream=True)]
    assert whole == first + [e.model_dump(exclude_unset=True) for e in rest]
    with _client(stack.gateway.url).responses.stream(response_id=response_id, starting_after=last) as resumed:
        again = list(resumed)
    assert [e.sequence_number for e in again] == [e.sequence_number for e in rest]


def test_cancel_while_queued_and_while_running(client: openai.OpenAI) -> None:
    running = client.responses.create(**PROMPT, **LONG, background=True)
    _until(client, running.id, ("in_progress",))
    queued = client.responses.create(**PROMPT, **LONG, background=True)
    assert client.responses.retrieve(queued.id).status == "queued"  # the worker's one slot is taken
    assert client.responses.cancel(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # idempotent
    events = list(client.responses.retrieve(queued.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert client.responses.cancel(running.id).status == "cancelled"
    # cancelled at once; the usage comes with the worker's own cancelled event, once it stopped
    ended = wait_for(lambda: (r := client.responses.retrieve(running.id)).usage and r, 30, what="the worker's stop")
    assert ended.status == "cancelled" and 0 < ended.usage.output_tokens < 900
    assert ended.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert client.responses.cancel(running.id).status == "cancelled"
    finished = client.responses.create(**PROMPT, **GREEDY, background=True)
    status = _until(client, finished.id, TERMINAL).status
    assert client.responses.cancel(finished.id).status == status  # a finished response comes back as it is
    foreground = client.responses.create(**PROMPT, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)


def test_delete_forgets_and_cancels(stack: Stack, client: openai.OpenAI) -> None:
    finished = client.responses.create(**PROMPT, **GREEDY)
    deleted = client.responses.delete(finished.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    raw = httpx.delete(f"{stack.gateway.url}/v1/responses/{finished.id}", timeout=30)
    assert raw.status_code == 404 and raw.json()["error"]["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(finished.id)
    running = client.responses.create(**PROMPT, **LONG, background=True)
    _until(client, running.id, ("in_progress",))
    answer = httpx.delete(f"{stack.gateway.url}/v1/responses/{running.id}", timeout=30).json()
    assert answer == {"id": running.id, "object": "response.deleted", "deleted": True}
    admin = redis.Redis.from_url(stack.redis.url)
    request_id = running.id.removeprefix("resp_")
    ends = wait_for(
        lambda: [e for e in read_events(admin, Keys("tiny"), request_id) if e.type.terminal], 30, what="cancelled"
    )
    assert ends[0].finish_reason == "cancelled"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel(running.id)


def test_store_false_keeps_nothing_retrievable(client: openai.OpenAI) -> None:
    response = client.responses.create(**PROMPT, **GREEDY, store=False)
    assert response.output_text is not None and response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    streamed = list(client.responses.create(**PROMPT, **GREEDY, store=False, stream=True))
    assert streamed[-1].type in ("response.completed", "response.incomplete")
    assert _deltas(streamed) == response.output_text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(**PROMPT, **GREEDY)
    second = client.responses.create(
        model="tiny", input="And another?", previous_response_id=first.id, instructions="Be brief.", **GREEDY
    )
    chat = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And another?"},
        ],
        max_tokens=24,
        temperature=0,
    )
    assert second.output_text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="tiny", input="x", previous_response_id="resp_" + "0" * 32)
    assert raised.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_another_key_cannot_see_it_and_it_expires_after_the_retention(keyed: GatewayProcess) -> None:
    mine, theirs = _client(keyed.url, "key-a"), _client(keyed.url, "key-b")
    response = mine.responses.create(**PROMPT, **GREEDY)
    assert mine.responses.retrieve(response.id).id == response.id
    for call in (theirs.responses.retrieve, theirs.responses.cancel, theirs.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(response.id)
    with pytest.raises(openai.AuthenticationError):
        _client(keyed.url, "wrong").responses.retrieve(response.id)

    def gone() -> bool:
        try:
            mine.responses.retrieve(response.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(gone, 30, 0.2, "the response to expire after its two-second retention")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0].type",
        ),
        ({"tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
        ({"previous_response_id": "resp_nope"}, 400, "previous_response_id"),
        ({"input": "x" * 1_000_001}, 400, "input"),
        ({"model": "no-such-model"}, 404, "model"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}},
            400,
            "text.format.schema",
        ),
    ],
)
def test_bad_input_answers_openai_error_bodies(stack: Stack, body: dict[str, Any], status: int, param: str) -> None:
    response = httpx.post(f"{stack.gateway.url}/v1/responses", json={**PROMPT, **body}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_unknown_ids_and_oversize_bodies(stack: Stack, client: openai.OpenAI) -> None:
    for response_id in ("resp_" + "0" * 32, "resp_zz", "chatcmpl-1"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            client.responses.cancel(response_id)
    huge = httpx.post(
        f"{stack.gateway.url}/v1/responses",
        content=b'{"model": "tiny", "input": "' + b"x" * (17 * 2**20) + b'"}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_kill_9_mid_generation_completes_and_a_resumed_stream_sees_one_text(
    stack: Stack, replica: GatewayProcess, client: openai.OpenAI, tiny_llama: Path, tmp_path: Path
) -> None:
    body = {
        **PROMPT,
        "temperature": 0,
        "max_output_tokens": 900,
        "ignore_eos": True,
        "background": True,
        "stream": True,
    }
    first: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.gateway.url}/v1/responses", json=body, timeout=60) as response:
        for event in _sse(response.iter_lines()):
            first.append(event)
            if event["type"] == "response.output_text.delta":
                break
    stack.worker.signal(signal.SIGKILL)
    stack.worker.process.wait()
    response_id, last = first[0]["response"]["id"], first[-1]["sequence_number"]
    # resumed on the other replica while no worker runs it: the stream follows the restart live
    resumed: list[Any] = []
    follower = threading.Thread(
        target=lambda: resumed.extend(
            _client(replica.url).responses.retrieve(response_id, stream=True, starting_after=last)
        ),
        daemon=True,
    )
    follower.start()
    stack.worker = WorkerProcess(stack.redis.url, tiny_llama, tmp_path / "worker-b.log", ["--max-num-seqs", "1"])
    stack.worker.wait_ready()
    follower.join(300)
    assert not follower.is_alive(), "the resumed stream did not end"
    final = client.responses.retrieve(response_id)
    assert final.status == "incomplete" and final.usage is not None and final.usage.output_tokens == 900
    admin = redis.Redis.from_url(stack.redis.url)
    entries = read_events(admin, Keys("tiny"), response_id.removeprefix("resp_"))
    assert EventType.RESTART in [e.type for e in entries]  # the new worker started it over
    assert [e.sequence_number for e in resumed] == list(range(last + 1, last + 1 + len(resumed)))
    assert not [e for e in resumed if e.type == "error"] and resumed[-1].type == "response.incomplete"
    assert _deltas(first) + _deltas(resumed) == final.output_text
    again = client.responses.create(**PROMPT, temperature=0, max_output_tokens=900, extra_body={"ignore_eos": True})
    assert again.output_text == final.output_text


class Answer(BaseModel):
    colour: Literal["red", "green", "blue"]
    score: int = Field(ge=0, le=9)


def test_text_format_json_schema_parses_into_the_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(**PROMPT, text_format=Answer, temperature=0, max_output_tokens=120)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    # a random model in a JSON object may not close it within the limit: what it wrote is JSON so far
    loose = client.responses.create(
        **PROMPT, text={"format": {"type": "json_object"}}, temperature=0, max_output_tokens=8
    )
    assert loose.output_text.lstrip().startswith("{")


def test_background_responses_announce_their_end_to_a_webhook(stack: Stack, tmp_path: Path) -> None:
    """response.completed / .incomplete / .cancelled, written by the scripts that end the request, delivered
    and signed (the receiver verifies with the SDK's webhooks.unwrap); a foreground response sends none."""
    receiver = Receiver().start()
    secret = new_secret()
    hooks = [{"name": "app", "url": receiver.url("/hook"), "secret": secret}]
    hooked = GatewayProcess(
        stack.redis.url,
        tmp_path / "hooked.log",
        "--webhook-allowed-networks",
        "127.0.0.0/8",
        "--webhook-poll-s",
        "0.1",
        env={"TOKENRELAY_WEBHOOK_ENDPOINTS": json.dumps(hooks)},
    ).wait_ready()
    try:
        client = _client(hooked.url)
        completed = client.responses.create(**PROMPT, **GREEDY, background=True)
        short = {"temperature": 0, "max_output_tokens": 2, "extra_body": {"ignore_eos": True}}
        incomplete = client.responses.create(**PROMPT, **short, background=True)
        cancelled = client.responses.create(**PROMPT, **LONG, background=True)
        client.responses.cancel(cancelled.id)
        foreground = client.responses.create(**PROMPT, **GREEDY)
        for response in (completed, incomplete):
            _until(client, response.id, TERMINAL)
        expected = {
            completed.id: "response." + client.responses.retrieve(completed.id).status,
            incomplete.id: "response.incomplete",
            cancelled.id: "response.cancelled",
        }
        sdk = openai.OpenAI(api_key="unused")

        def events() -> dict[str, Any]:
            unwrapped = [sdk.webhooks.unwrap(d.body, d.headers, secret=secret) for d in receiver.deliveries("/hook")]
            return {e.data.id: e for e in unwrapped}

        wait_for(lambda: set(expected) <= set(events()), 60, 0.1, "three response events")
        assert {i: e.type for i, e in events().items() if i in expected} == expected
        assert foreground.id not in events()
    finally:
        hooked.stop()
        receiver.stop()


def test_a_retried_background_create_with_an_idempotency_key_returns_the_first(
    client: openai.OpenAI, replica: GatewayProcess
) -> None:
    headers = {"Idempotency-Key": "resp-retry-1"}
    first = client.responses.create(**PROMPT, **GREEDY, background=True, extra_headers=headers)
    again = _client(replica.url).responses.create(**PROMPT, **GREEDY, background=True, extra_headers=headers)
    assert again.id == first.id
    other = client.responses.create(**PROMPT, **GREEDY, background=True, extra_headers={"Idempotency-Key": "b"})
    assert other.id != first.id
    for response_id in (first.id, other.id):
        assert _until(client, response_id, TERMINAL).status in ("completed", "incomplete")
