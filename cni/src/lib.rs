//! `istio-capture-cni` as a library: [`respond`] answers one CNI invocation (what the binary
//! does for a runtime), either for real or as a dry run that decides everything the input
//! alone decides (every refusal and ADD's reply) and touches no namespace, which is what the
//! fuzz target drives. The binary (main.rs) is a thin shell around it and the command line.

#![deny(unsafe_code)]

mod install;
mod istio_keys;
mod netconf;
mod plugin;
mod pod;
mod protocol;

use std::io;
use std::process::ExitCode;

use serde_json::Value;

use netconf::{CniArgs, NetConf};
use protocol::{Command, Invocation, PluginError, LATEST_VERSION};

pub use install::main as command_line;

/// Whether an invocation changes the pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As for a runtime: ADD programs the capture, DEL removes it, CHECK reads it.
    Run,
    /// Everything up to the pod's namespace: the same input refused the same way, ADD's reply,
    /// and nothing entered, read or changed.
    DryRun,
}

/// What the plugin tells its runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// For stdout: the result (ADD, VERSION), the spec's error object, or nothing (DEL, CHECK).
    pub stdout: Option<Value>,
    /// For stderr (the runtime's log, read by people): the error, when it failed.
    pub error: Option<String>,
}

impl Answer {
    fn reply(result: Option<Value>) -> Answer {
        Answer { stdout: result, error: None }
    }

    /// The error object, in the configuration's version, and the message with what is known
    /// of the request.
    fn refusal(error: &PluginError, cni_version: &str, details: &str) -> Answer {
        Answer { stdout: Some(error.to_json(cni_version, details)), error: Some(format!("{details}: {error}")) }
    }

    /// Writes the answer where runtimes and people read it; the exit status says which it is.
    pub fn emit(&self) -> ExitCode {
        if let Some(stdout) = &self.stdout {
            println!("{stdout}");
        }
        match &self.error {
            None => ExitCode::SUCCESS,
            Some(error) => {
                eprintln!("istio-capture-cni: {error}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Answers one invocation: the `CNI_*` variables through `var`, and stdin as read (read whatever
/// the command, so that a runtime writing the configuration never meets a closed pipe).
pub fn respond(var: impl Fn(&str) -> Option<String>, stdin: io::Result<Vec<u8>>, mode: Mode) -> Answer {
    let invocation = match Invocation::from_vars(var) {
        Ok(invocation) => invocation,
        Err(e) => return Answer::refusal(&e, LATEST_VERSION, "the CNI_* environment variables"),
    };
    let unknown_pod = || plugin::describe(&invocation, None);
    if invocation.command == Command::Version {
        return Answer::reply(Some(protocol::version_info()));
    }
    if invocation.command == Command::Del {
        // DEL reads no configuration (see plugin::delete); its errors are in the declared version.
        let cni_version = stdin.as_deref().ok().and_then(netconf::declared_version).unwrap_or_else(|| LATEST_VERSION.into());
        return match mode {
            Mode::Run => plugin::delete(&invocation),
            Mode::DryRun => Ok(None),
        }
        .map_or_else(|e| Answer::refusal(&e, &cni_version, &unknown_pod()), Answer::reply);
    }
    let stdin = match stdin {
        Ok(stdin) => stdin,
        Err(e) => return Answer::refusal(&PluginError::Stdin(e), LATEST_VERSION, &unknown_pod()),
    };
    let conf = match NetConf::parse(&stdin) {
        Ok(conf) => conf,
        Err(e) => return Answer::refusal(&e, LATEST_VERSION, &unknown_pod()),
    };
    let args = match CniArgs::parse(&invocation.args) {
        Ok(args) => args,
        Err(e) => return Answer::refusal(&e, &conf.cni_version, &unknown_pod()),
    };
    let handled = match (mode, invocation.command) {
        (Mode::DryRun, _) => plugin::dry_run(&invocation, &conf, &args),
        (Mode::Run, Command::Add) => plugin::add(&invocation, &conf, &args),
        (Mode::Run, _) => plugin::check(&invocation, &conf, &args),
    };
    handled.map_or_else(|e| Answer::refusal(&e, &conf.cni_version, &plugin::describe(&invocation, Some(&args))), Answer::reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dry_run(command: &str, netns: Option<&str>, cni_args: &str, stdin: &str) -> Answer {
        let var = |name: &str| match name {
            "CNI_COMMAND" => Some(command.to_string()),
            "CNI_NETNS" => netns.map(str::to_string),
            "CNI_ARGS" => Some(cni_args.to_string()),
            "CNI_CONTAINERID" | "CNI_IFNAME" | "CNI_PATH" => Some("x".into()),
            _ => None,
        };
        respond(var, Ok(stdin.as_bytes().to_vec()), Mode::DryRun)
    }

    const POD: Option<&str> = Some("/var/run/netns/a-pod-that-is-not-there");

    #[test]
    fn a_dry_add_passes_the_previous_result_on() {
        let conf = json!({ "cniVersion": "0.4.0", "name": "k8s", "prevResult": { "ips": [{ "address": "10.1.0.5/24" }] } });
        let answer = dry_run("ADD", POD, "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop", &conf.to_string());
        assert_eq!(answer, Answer::reply(Some(json!({ "ips": [{ "address": "10.1.0.5/24" }], "cniVersion": "0.4.0" }))));
        assert_eq!(dry_run("DEL", None, "", "not even JSON"), Answer::reply(None));
        assert_eq!(dry_run("VERSION", None, "", "").stdout, Some(protocol::version_info()));
    }

    #[test]
    fn refusals_are_error_objects_in_the_version_the_input_allows() {
        let refusal = |answer: Answer| (answer.stdout.unwrap(), answer.error.unwrap());
        let (object, message) = refusal(dry_run("ADD", POD, "", "{not json"));
        assert_eq!((object["code"].as_u64(), object["cniVersion"].as_str()), (Some(6), Some(LATEST_VERSION)));
        assert!(message.contains("cannot decode"), "{message}");
        let bad_port = r#"{"cniVersion":"0.3.1","name":"k8s","capture":{"proxyPort":"70000"}}"#;
        let (object, message) = refusal(dry_run("ADD", POD, "", bad_port));
        assert_eq!((object["code"].as_u64(), object["cniVersion"].as_str()), (Some(7), Some("0.3.1")));
        assert!(message.contains("proxyPort") && message.contains("ADD for container \"x\""), "{message}");
        let (object, _) = refusal(dry_run("ADD", None, "", bad_port));
        assert_eq!(object["code"], 4, "CNI_NETNS is missing: {object}");
        let (object, _) = refusal(dry_run("CHECK", POD, "", r#"{"cniVersion":"0.3.1","name":"k8s"}"#));
        assert_eq!(object["code"], 1, "CHECK before 0.4.0: {object}");
        let (object, _) = refusal(dry_run("ADD", POD, "FOO=1", r#"{"cniVersion":"1.0.0","name":"k8s"}"#));
        assert_eq!(object["code"], 4, "an unknown CNI_ARGS key: {object}");
    }
}
