"""Tools around the library: fetcher, CLI, benchmark harness, demo app and browser, training commands."""
