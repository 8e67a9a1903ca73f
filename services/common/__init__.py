"""Runtime shared by every service: bootstrap, config, storage, telemetry, auth and errors."""
