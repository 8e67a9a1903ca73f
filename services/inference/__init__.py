"""The inference service (contract: proto/mt5/inference/v1); every method answers UNIMPLEMENTED for now."""
