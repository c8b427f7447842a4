//! Helpers for tests that build network namespaces.
