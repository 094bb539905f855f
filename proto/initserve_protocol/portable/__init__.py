"""The portable generator (issue 20): a versioned, device- and release-independent generator, specified in
docs/portable.md. This package holds its executable reference, written to be read: pure Python, no torch."""
