//! `istio-capture-cni`: a chained CNI plugin (spec 1.0) that programs Istio's sidecar capture
//! in each pod's network namespace when the pod is created, with capture-lib, so pods need no
//! privileged init container. `istio-capture-cni install` puts it on a node and `uninstall`
//! takes it off (see install.rs).
//!
//! The runtime runs it with `CNI_COMMAND` and the other `CNI_*` variables set, no arguments,
//! and the network configuration on stdin; the result, or an error object with a CNI error
//! code, goes to stdout. Run without `CNI_COMMAND` and with arguments, it is a command line
//! tool (`--help`, `--version`, `install`, `uninstall`).

#![deny(unsafe_code)]

mod install;
mod istio_keys;
mod netconf;
mod plugin;
mod pod;
mod protocol;

use std::io::Read;
use std::process::ExitCode;

use netconf::{CniArgs, NetConf};
use protocol::{Command, Invocation, PluginError, LATEST_VERSION};

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_none() && std::env::args_os().len() > 1 {
        return install::main();
    }
    // Read first, whatever the command: a runtime writing the configuration must not meet a
    // closed pipe.
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let invocation = match Invocation::from_vars(|name| std::env::var(name).ok()) {
        Ok(invocation) => invocation,
        Err(e) => return fail(&e, LATEST_VERSION, "the CNI_* environment variables"),
    };
    let add = match invocation.command {
        Command::Version => return reply(&protocol::version_info()),
        // DEL reads no configuration (see plugin::delete); its errors are in the declared version.
        Command::Del => {
            let cni_version = netconf::declared_version(&stdin).unwrap_or_else(|| LATEST_VERSION.to_string());
            return match plugin::delete(&invocation) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e, &cni_version, &plugin::describe(&invocation, None)),
            };
        }
        Command::Add => true,
        Command::Check => false,
    };
    if let Err(e) = read {
        return fail(&PluginError::Stdin(e), LATEST_VERSION, &plugin::describe(&invocation, None));
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(conf) => conf,
        Err(e) => return fail(&e, LATEST_VERSION, &plugin::describe(&invocation, None)),
    };
    let args = match CniArgs::parse(&invocation.args) {
        Ok(args) => args,
        Err(e) => return fail(&e, &conf.cni_version, &plugin::describe(&invocation, None)),
    };
    let handled = if add { plugin::add(&invocation, &conf, &args) } else { plugin::check(&invocation, &conf, &args) };
    match handled {
        Ok(Some(result)) => reply(&result),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &conf.cni_version, &plugin::describe(&invocation, Some(&args))),
    }
}

fn reply(result: &serde_json::Value) -> ExitCode {
    println!("{result}");
    ExitCode::SUCCESS
}

/// The spec's error object on stdout (what runtimes read), the message on stderr (what
/// people read in the runtime's log), and a non-zero exit.
fn fail(error: &PluginError, cni_version: &str, details: &str) -> ExitCode {
    println!("{}", error.to_json(cni_version, details));
    eprintln!("istio-capture-cni: {details}: {error}");
    ExitCode::FAILURE
}
