"""The OpenAI-compatible HTTP gateway: a producer that speaks HTTP on one side and Redis on the other.

`producer.gateway.app.create_app` builds the FastAPI app; `requests`, `responses` and `errors` hold the
OpenAI shapes and need no web framework (`tokenrelay batch` uses them too).
"""
