"""The repository's own rules: the packages' walls, the docs' links and the README's length."""
