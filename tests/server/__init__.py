"""The server package: engine, cache, pools, budgets, validation, the process and its flags."""
