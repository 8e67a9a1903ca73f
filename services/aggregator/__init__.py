"""The aggregator service (contract: proto/mt5/aggregator/v1); every method answers UNIMPLEMENTED for now."""
