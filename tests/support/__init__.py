"""Test-only support code shared by the tests: trainer set-up, float64 references, file writers, the CLI help
documents. Nothing here is imported by the library."""
