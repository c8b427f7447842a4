//! Programs Istio-style traffic capture in a pod's network namespace.
//!
//! Data flows one way:
//! [`config`] (validated settings) → [`model`] (the capture algorithm, backend-neutral) →
//! a backend ([`iptables`]) that renders and applies it.

pub mod config;
pub mod model;
