"""Model loading and the Hugging Face adapter that runs packed, paged batches."""
