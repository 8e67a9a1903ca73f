"""The indicators service (contract: proto/mt5/indicators/v1); every method answers UNIMPLEMENTED for now."""
