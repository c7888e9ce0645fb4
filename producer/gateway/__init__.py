"""The OpenAI-compatible HTTP gateway: a producer that speaks HTTP on one side and Redis on the other."""

from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
