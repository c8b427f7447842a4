//! One run of the tool: build the ruleset, hand it to the chosen backend, then routes.
//!
//! This is the only place that sequences the steps, so "what happens, in which order, and
//! what is undone when a step fails" reads top to bottom here.

use std::fmt::Write;

use thiserror::Error;

use crate::config::CaptureConfig;
use crate::iptables::{self, IptablesError, IptablesOptions};
use crate::model::{self, Dialect};
use crate::Outcome;

pub use crate::iptables::Operation;

/// Which netfilter interface programs the rules.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Iptables(IptablesOptions),
    Nftables,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub config: CaptureConfig,
    pub backend: Backend,
    pub operation: Operation,
    /// Print what would be sent and change nothing.
    pub dry_run: bool,
}

/// What happened, for the caller to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// With `dry_run`: everything that would have been sent.
    pub dry_run: Option<String>,
    /// Things the user should know that did not stop the run.
    pub warnings: Vec<String>,
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("--native-nftables is not available in this build yet")]
    NftablesUnavailable,
}

pub fn run(req: &Request) -> Result<Report, CaptureError> {
    match req.backend {
        Backend::Iptables(opts) => run_iptables(req, &opts),
        Backend::Nftables => Err(CaptureError::NftablesUnavailable),
    }
}

fn run_iptables(req: &Request, opts: &IptablesOptions) -> Result<Report, CaptureError> {
    let ruleset = model::build(&req.config, Dialect::Iptables);
    let plan = iptables::plan(&ruleset, req.operation, opts)?;
    if req.dry_run {
        let mut text = String::new();
        if plan.steps.is_empty() {
            text.push_str("# nothing to change: the rules are already as requested\n");
        }
        for step in &plan.steps {
            let _ = writeln!(text, "# {}\n{}", step.command(), step.payload);
        }
        return Ok(Report { outcome: plan.outcome, dry_run: Some(text), warnings: Vec::new() });
    }
    let outcome = iptables::execute(&plan, opts)?;
    Ok(Report { outcome, dry_run: None, warnings: Vec::new() })
}
