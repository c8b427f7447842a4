//! The man pages and completions our release binaries generate name their real flags and
//! environment variables. (Release binaries: `cargo build --release` first, as scripts/test.sh does.)

use std::process::Command;

use capture_tests::{release_bin, run_ok};

const SHELLS: [&str; 5] = ["bash", "zsh", "fish", "elvish", "powershell"];

fn output(program: &str, args: &[&str]) -> String {
    String::from_utf8(run_ok(Command::new(release_bin(program)).args(args)).stdout).unwrap()
}

/// A man page with roff's escaped hyphens turned back into plain ones.
fn man_page(program: &str) -> String {
    let page = output(program, &["--generate-man"]);
    assert!(page.starts_with(".ie") || page.contains(".TH"), "not a man page: {page}");
    page.replace("\\-", "-")
}

#[test]
fn istio_iptables_docs_name_its_flags_and_variables() {
    let page = man_page("istio-iptables");
    for want in [".TH istio-iptables", "--native-nftables", "--istio-inbound-ports", "REDIRECT_DNS", "ISTIO_SERVICE_CIDR"] {
        assert!(page.contains(want), "man page lacks {want}");
    }
    for shell in SHELLS {
        let script = output("istio-iptables", &["--generate-completions", shell]);
        // Long names without their dashes: fish writes `-l native-nftables`.
        for flag in ["native-nftables", "istio-service-cidr", "cleanup-only"] {
            assert!(script.contains(flag), "{shell} completion lacks {flag}");
        }
    }
    // Wrapped lines joined: clap breaks `[env: NAME=]` wherever the terminal width falls.
    let help = output("istio-iptables", &["--help"]).split_whitespace().collect::<Vec<_>>().join(" ");
    for env in ["[env: ISTIO_INBOUND_PORTS=", "[env: NATIVE_NFTABLES=", "[env: INBOUND_CAPTURE_PORT="] {
        assert!(help.contains(env), "--help lacks {env}");
    }
    assert!(!help.contains("--generate-man"), "the generators stay out of --help");
}

#[test]
fn capture_proxy_docs_name_its_flags() {
    let page = man_page("capture-proxy");
    for want in [".TH capture-proxy", "--inbound-mode", "--outbound-port", "INBOUND_INTERCEPTION_MODE"] {
        assert!(page.contains(want), "man page lacks {want}");
    }
    for shell in SHELLS {
        let script = output("capture-proxy", &["--generate-completions", shell]);
        assert!(script.contains("inbound-mode") && script.contains("drain-timeout"), "{shell} completion");
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = Command::new(release_bin("istio-iptables")).args(["--generate-completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash, elvish, fish, powershell or zsh"));
}
