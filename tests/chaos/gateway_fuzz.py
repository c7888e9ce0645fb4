"""schemathesis on the gateway: its own OpenAPI document, with the OpenAI request bodies filled in.

The gateway parses its JSON bodies by hand (to answer OpenAI-shaped 400s), so FastAPI's schema lists
the operations but no bodies; the shapes below describe them, loosely, for generation. Each
operation gets positive cases (bodies that fit the shapes) and negative ones (bodies that break
them), sent over HTTP to a gateway in front of a real worker; every answer must be a deliberate
one: nothing in the 5xx range but 504 (a request that ran past the gateway's deadline).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

_text = {"type": "string", "minLength": 1, "maxLength": 64}
_ids = {"type": "array", "minItems": 1, "maxItems": 16, "items": {"type": "integer", "minimum": 0, "maximum": 31_999}}
_prompt = {
    "anyOf": [
        _text,
        {"type": "array", "minItems": 1, "maxItems": 3, "items": _text},
        _ids,
        {"type": "array", "minItems": 1, "maxItems": 3, "items": _ids},
    ]
}
_sampling = {
    "model": {"type": "string", "enum": ["tiny"]},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 16},
    "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "stream": {"type": "boolean"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0.01, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": 100},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31},
    "stop": {"anyOf": [_text, {"type": "array", "maxItems": 4, "items": _text}]},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "priority": {"type": "string", "enum": ["high", "normal", "low"]},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "user": {"type": "string"},
}
_message = {
    "type": "object",
    "required": ["role", "content"],
    "additionalProperties": False,
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "anyOf": [
                {"type": "string", "maxLength": 64},
                {
                    "type": "array",
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "additionalProperties": False,
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                    },
                },
            ]
        },
    },
}
BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": False,
        "properties": {
            **_sampling,
            "prompt": _prompt,
            "echo": {"type": "boolean"},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
        },
    },
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": False,
        "properties": {
            **_sampling,
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 16},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
            "messages": {"type": "array", "minItems": 1, "maxItems": 4, "items": _message},
        },
    },
    "/v1/batches": {
        "type": "object",
        "required": ["input_file_id", "endpoint", "completion_window"],
        "additionalProperties": False,
        "properties": {
            "input_file_id": {"type": "string", "maxLength": 64},
            "endpoint": {"type": "string", "enum": ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]},
            "completion_window": {"type": "string", "maxLength": 8},
        },
    },
    "/v1/responses": {
        "type": "object",
        "required": ["model", "input"],
        "additionalProperties": False,
        "properties": {
            "model": _sampling["model"],
            "input": {
                "anyOf": [
                    _text,
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 3,
                        "items": {
                            "type": "object",
                            "required": ["role", "content"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string", "enum": ["message"]},
                                "role": _message["properties"]["role"],
                                "content": {
                                    "anyOf": [
                                        {"type": "string", "maxLength": 64},
                                        {
                                            "type": "array",
                                            "maxItems": 3,
                                            "items": {
                                                "type": "object",
                                                "required": ["type", "text"],
                                                "additionalProperties": False,
                                                "properties": {
                                                    "type": {"type": "string", "enum": ["input_text", "output_text"]},
                                                    "text": {"type": "string"},
                                                },
                                            },
                                        },
                                    ]
                                },
                            },
                        },
                    },
                ]
            },
            "instructions": {"type": "string", "maxLength": 64},
            "max_output_tokens": _sampling["max_tokens"],
            "temperature": _sampling["temperature"],
            "top_p": _sampling["top_p"],
            "seed": _sampling["seed"],
            "stream": {"type": "boolean"},
            "background": {"type": "boolean"},
            "store": {"type": "boolean"},
            "metadata": {
                "type": "object",
                "maxProperties": 4,
                "additionalProperties": {"type": "string", "maxLength": 16},
            },
            "text": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "format": {
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
                    }
                },
            },
            "previous_response_id": {"type": "string", "maxLength": 40},
        },
    },
}
ACCEPTABLE_5XX = {504}  # past the deadline the gateway gave the request: an answer, not a failure


def with_bodies(openapi: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(openapi)
    for path, body in BODIES.items():
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return schema


@dataclass(slots=True)
class GatewayFuzzReport:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # "METHOD path -> status: body" of each failure

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "statuses": dict(sorted(self.statuses.items())),
            "server_errors": len(self.server_errors),
        }


def run_gateway_fuzz(base_url: str, examples: int) -> GatewayFuzzReport:
    """`examples` positive and `examples` negative cases for every operation of the gateway's schema."""
    openapi = httpx.get(f"{base_url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(with_bodies(openapi))
    report = GatewayFuzzReport()
    for path, methods in openapi["paths"].items():
        for method in methods:
            operation = schema[path][method.upper()]
            # only a body can be broken (a path parameter takes any string): no negative cases to draw elsewhere
            breakable = path in BODIES and method.lower() == "post"
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if breakable else (GenerationMode.POSITIVE,):
                _fuzz(operation, mode, base_url, examples, report)
    return report


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, examples: int, report: GatewayFuzzReport) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=120)
        report.cases += 1
        report.statuses[response.status_code] += 1
        if response.status_code >= 500 and response.status_code not in ACCEPTABLE_5XX:
            report.server_errors.append(
                f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
                f"{response.status_code}: {response.text[:300]}"
            )

    send()
