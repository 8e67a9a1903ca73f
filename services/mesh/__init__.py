"""The mesh as a whole: the Envoy gateway configuration and the tooling that runs every service."""
