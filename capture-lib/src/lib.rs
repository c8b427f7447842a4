//! Programs Istio-style traffic capture in a pod's network namespace.
//!
//! Data flows one way:
//! [`config`] (validated settings) → [`model`] (the capture algorithm, backend-neutral) →
//! a backend (`iptables`, `nftables`, each implementing [`capture::RuleBackend`]) that renders
//! and applies it, plus `routes` for the addresses and policy routing the rules rely on;
//! [`capture`] sequences a run. [`settings`] gives user-facing values
//! (flags, CNI configuration) their meaning once, for every front end.

#![deny(unsafe_code)]

pub mod accounts;
pub mod capture;
pub mod config;
pub mod drift;
pub mod family;
pub mod ipset;
pub mod iptables;
pub mod log_level;
pub mod model;
pub mod namespace;
pub mod netlink;
pub mod nftables;
pub mod routes;
pub mod settings;
pub mod validation;

/// What a backend did to the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing of ours was there; the ruleset was installed.
    Applied,
    /// The ruleset was already exactly in place; nothing was sent to the kernel.
    Unchanged,
    /// Our rules had drifted and were replaced (atomically per table).
    Reconciled,
    /// Cleanup removed our rules.
    Removed,
    /// Cleanup found nothing of ours.
    NothingToRemove,
}

/// How much of a run the report describes: the caller's log level decides, so a quiet run
/// renders no text it would not print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Detail {
    /// The outcome and warnings.
    #[default]
    Outcome,
    /// Also every change sent to the kernel, as text a person can read and replay.
    Sent,
    /// Also the state read from the namespace and what was decided from it.
    Trace,
}
