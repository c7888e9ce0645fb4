"""Bulk jobs: OpenAI Batch API JSONL in, JSONL out, through the queue with a bounded window (resumable)."""

from producer.batch.files import BatchInputError
from producer.batch.runner import BatchSummary, run_batch

__all__ = ["BatchInputError", "BatchSummary", "run_batch"]
