"""The test suite, laid out like the package (see README, "Tests")."""
