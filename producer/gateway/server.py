"""`tokenrelay serve`: the gateway under uvicorn, settings printed once at start-up."""

from __future__ import annotations

import structlog
import uvicorn

from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings

log = structlog.get_logger(__name__)


def run_gateway(settings: GatewaySettings) -> int:
    log.info("gateway settings", **settings.describe())
    app = create_app(settings)
    # uvicorn's own access log would duplicate the metrics and print prompts' URLs: structlog lines only
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, timeout_graceful_shutdown=30
    )
    return 0
