//! `istio-capture-cni`: a chained CNI plugin (spec 1.0) that programs Istio's sidecar capture
//! in each pod's network namespace when the pod is created, with capture-lib, so pods need no
//! privileged init container. `istio-capture-cni install` puts it on a node and `uninstall`
//! takes it off (see install.rs).
//!
//! The runtime runs it with `CNI_COMMAND` and the other `CNI_*` variables set, no arguments,
//! and the network configuration on stdin; the result, or an error object with a CNI error
//! code, goes to stdout (lib.rs). Run without `CNI_COMMAND` and with arguments, it is a command
//! line tool (`--help`, `--version`, `install`, `uninstall`).

#![deny(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use istio_capture_cni::{command_line, respond, Mode};

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_none() && std::env::args_os().len() > 1 {
        return command_line();
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    respond(|name| std::env::var(name).ok(), read, Mode::Run).emit()
}
