"""Data: dataset layouts, reference-identical preprocessing, few-shot reference sets, sampling, pipeline."""
