//! Hidden `--generate-man` and `--generate-completions SHELL` for our binaries, rendered from
//! each binary's own clap definition so the docs cannot drift from the flags. Packagers run
//! e.g. `istio-iptables --generate-man > istio-iptables.8`.
//!
//! The request must be the first argument; it is looked for before the binary parses its
//! flags, so no binary has to declare it (and `--help` stays about real work).

#![deny(unsafe_code)]

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;

/// Prints the requested docs and returns the exit code, or `None` when `args` (without the
/// program name) ask for none and the binary should run as usual.
pub fn generate_if_requested(args: &[OsString], command: impl FnOnce() -> Command) -> Option<ExitCode> {
    let first = args.first()?.to_str()?;
    let result = match first {
        "--generate-man" => clap_mangen::Man::new(command()).render(&mut io::stdout().lock()),
        "--generate-completions" => {
            let mut command = command();
            let name = command.get_name().to_string();
            match args.get(1).and_then(|s| s.to_str()).map(str::parse::<Shell>) {
                Some(Ok(shell)) => {
                    clap_complete::generate(shell, &mut command, name, &mut io::stdout().lock());
                    io::stdout().flush()
                }
                _ => {
                    eprintln!("{name}: --generate-completions needs a shell: bash, elvish, fish, powershell or zsh");
                    return Some(ExitCode::from(2));
                }
            }
        }
        _ => return None,
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the generated text: {e}");
            ExitCode::FAILURE
        }
    })
}
