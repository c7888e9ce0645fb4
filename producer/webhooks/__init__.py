"""Webhooks: events of finished jobs, from an outbox in Redis, signed per Standard Webhooks (OpenAI's format)."""
