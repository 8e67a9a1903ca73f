"""The ingest service: durable, exactly-once entry point for candles and ticks."""
