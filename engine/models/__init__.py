"""Model loading and preparation (fuse, quantize, pack, offload), and the HF adapter that runs packed batches."""
