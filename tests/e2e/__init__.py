"""The contract end to end: exact bytes and errors through real servers, faults, fuzz, load, transports, security."""
