"""The SDK: both clients, the fetch pipeline, memory policy, models, the CLI (real servers where a server is needed)."""
