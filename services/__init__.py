"""mt5-mesh services: ingest, aggregator, indicators and inference, plus their shared runtime."""
