"""HTTP batches (the OpenAI Batch API) run on the queue: validation, the ledger scripts, output files."""
