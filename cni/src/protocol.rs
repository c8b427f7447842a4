//! The CNI execution protocol (spec 1.0): the variables the runtime sets, the versions we
//! speak, and the error object runtimes read from stdout.

use std::fmt;
use std::io;
use std::path::PathBuf;

use capture_lib::capture::CaptureError;
use capture_lib::config::ConfigError;
use capture_lib::namespace::NamespaceError;
use serde_json::{json, Value};
use thiserror::Error;

/// Every version whose configuration and result formats we accept and return unchanged.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version of our own replies when the configuration names none.
pub const LATEST_VERSION: &str = "1.0.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        })
    }
}

/// The `CNI_*` variables of one invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Absent for a DEL whose namespace is already gone.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
    pub args: String,
}

impl Invocation {
    /// Reads the variables through `var`, requiring those the command needs (spec 1.0:
    /// CNI_NETNS is optional for DEL only; we never use CNI_PATH, so DEL does not need it).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, PluginError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            other => return Err(PluginError::UnknownCommand(other.unwrap_or_default().to_string())),
        };
        let present = |name| var(name).filter(|v| !v.is_empty());
        let mut required = match command {
            Command::Version => vec![],
            Command::Del => vec!["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Add | Command::Check => vec!["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
        };
        required.retain(|name| present(name).is_none());
        if let Some(missing) = required.first() {
            return Err(PluginError::MissingVariable { name: missing, command });
        }
        Ok(Invocation {
            command,
            container_id: present("CNI_CONTAINERID").unwrap_or_default(),
            netns: present("CNI_NETNS").map(PathBuf::from),
            args: var("CNI_ARGS").unwrap_or_default(),
        })
    }
}

/// The reply to VERSION.
pub fn version_info() -> Value {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Whether a configuration of `version` may ask for CHECK (introduced in 0.4.0).
pub fn allows_check(version: &str) -> bool {
    !version.starts_with("0.3.")
}

/// The error codes of the spec (1-99) and the generic plugin failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    Failed = 999,
}

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("CNI_COMMAND is {0:?}; expected ADD, DEL, CHECK or VERSION")]
    UnknownCommand(String),
    #[error("{name} is not set, and {command} needs it")]
    MissingVariable { name: &'static str, command: Command },
    #[error("CNI_ARGS: {0}")]
    Args(String),
    #[error("cannot read the network configuration from stdin: {0}")]
    Stdin(io::Error),
    #[error("cannot decode the network configuration: {0}")]
    Decode(serde_json::Error),
    #[error("cniVersion {0:?} is not supported (supported: {supported})", supported = SUPPORTED_VERSIONS.join(", "))]
    Version(String),
    #[error("CHECK needs cniVersion 0.4.0 or later; the configuration says {0}")]
    CheckNotAllowed(String),
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("invalid capture setting: {0}")]
    Setting(#[from] ConfigError),
    #[error("invalid pod annotation {name}={value:?}: {why}")]
    Annotation { name: &'static str, value: String, why: String },
    #[error("CNI_NETNS: {0}")]
    Namespace(NamespaceError),
    #[error(
        "CNI_NETNS {0} is this plugin's own network namespace, the node's: the capture is for pods, and in the \
         node's namespace it would redirect the node's own traffic; refused"
    )]
    NodeNamespace(PathBuf),
    #[error("cannot tell whether CNI_NETNS is the node's own network namespace: /proc/self/ns/net: {0}")]
    OwnNamespaceUnknown(io::Error),
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

impl PluginError {
    pub fn code(&self) -> ErrorCode {
        match self {
            PluginError::UnknownCommand(_) | PluginError::MissingVariable { .. } | PluginError::Args(_) => {
                ErrorCode::InvalidEnvironment
            }
            PluginError::Stdin(_) => ErrorCode::Io,
            PluginError::Decode(_) => ErrorCode::Decode,
            PluginError::Version(_) | PluginError::CheckNotAllowed(_) => ErrorCode::IncompatibleVersion,
            PluginError::Config(_) | PluginError::Setting(_) | PluginError::Annotation { .. } | PluginError::NodeNamespace(_) => {
                ErrorCode::InvalidConfig
            }
            PluginError::Namespace(NamespaceError::Open { .. } | NamespaceError::Enter { .. })
            | PluginError::OwnNamespaceUnknown(_) => ErrorCode::InvalidEnvironment,
            PluginError::Namespace(NamespaceError::Busy(_))
            | PluginError::Capture(CaptureError::Namespace(NamespaceError::Busy(_))) => ErrorCode::TryAgainLater,
            PluginError::Namespace(_) | PluginError::Capture(_) => ErrorCode::Failed,
        }
    }

    /// The error object of the spec, in the configuration's version.
    pub fn to_json(&self, cni_version: &str, details: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code() as u32, "msg": self.to_string(), "details": details })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn invocation(vars: &[(&str, &str)]) -> Result<Invocation, PluginError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Invocation::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn add_needs_the_namespace_and_del_does_not() {
        let add = invocation(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/x")]);
        let err = add.unwrap_err();
        assert_eq!(err.to_string(), "CNI_NETNS is not set, and ADD needs it");
        assert_eq!(err.code(), ErrorCode::InvalidEnvironment);
        let del = invocation(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]).unwrap();
        assert_eq!((del.command, del.netns), (Command::Del, None));
    }

    #[test]
    fn unknown_commands_are_refused() {
        assert_eq!(invocation(&[("CNI_COMMAND", "GC")]).unwrap_err().code(), ErrorCode::InvalidEnvironment);
        assert!(invocation(&[]).unwrap_err().to_string().contains("CNI_COMMAND is \"\""));
        assert_eq!(invocation(&[("CNI_COMMAND", "VERSION")]).unwrap().command, Command::Version);
    }

    #[test]
    fn errors_carry_code_message_and_version() {
        let err = PluginError::Version("9.9.9".into());
        let reply = err.to_json("1.0.0", "container c1");
        assert_eq!(reply["code"], 1);
        assert_eq!(reply["cniVersion"], "1.0.0");
        assert!(reply["msg"].as_str().unwrap().contains("0.3.0, 0.3.1, 0.4.0, 1.0.0"));
        assert_eq!(reply["details"], "container c1");
    }

    #[test]
    fn check_arrived_in_0_4_0() {
        assert!(!allows_check("0.3.1"));
        assert!(allows_check("0.4.0") && allows_check("1.0.0"));
    }
}
