//! `istio-iptables` run with the arguments Istio's injector writes for istio-init (pilot-agent's
//! subcommand word first, its global logging flags), in real pod namespaces: what the kernel
//! holds, and what the log (`kubectl logs -c istio-init`) says.

use std::io::Write;
use std::process::{Output, Stdio};

use capture_tests::{istio_iptables, require_netns, run_ok, stderr, unique, Pod, SEED_ARGS};
use serde_json::Value;

/// The args-only istio-init container of Istio's injection template, for a default pod.
#[rustfmt::skip]
const TEMPLATE: &[&str] = &["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
    "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"];

fn tool(pod: &Pod, args: &[&str]) -> Output {
    istio_iptables(pod, args, &[])
}

/// The template's arguments followed by `extra` (a later value of a flag wins).
fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TEMPLATE.iter().copied().chain(extra.iter().copied()).collect()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every line of a `--log_as_json` log as a JSON object with Istio's fields.
fn json_records(log: &str) -> Vec<Value> {
    assert!(!log.is_empty(), "no log at all");
    log.lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let time = record["time"].as_str().unwrap_or_else(|| panic!("no time: {line}"));
            // 2006-01-02T15:04:05.000000Z, UTC with microseconds, as Istio writes it.
            assert!(time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "time {time:?}");
            let level = record["level"].as_str().unwrap_or_else(|| panic!("no level: {line}"));
            assert!(["debug", "info", "warn", "error"].contains(&level), "level {level:?}");
            assert!(record["msg"].is_string(), "no msg: {line}");
            // Istio's tool logs on its default scope, which zap does not name.
            assert!(record.get("scope").is_none(), "{line}");
            record
        })
        .collect()
}

/// The message of the one record that starts with `prefix`, without that line.
fn logged_text<'a>(records: &'a [Value], prefix: &str) -> Vec<&'a str> {
    records
        .iter()
        .filter_map(|r| r["msg"].as_str())
        .filter(|m| m.starts_with(prefix))
        .map(|m| m.split_once('\n').map_or("", |(_, rest)| rest))
        .collect()
}

/// A second pod programmed by `istio-iptables` run directly with Istio's flags (no subcommand
/// word, no global flags): what the injected container must leave.
fn reference(addr: &str, extra: &[&str]) -> Pod {
    let pod = Pod::with_address(addr);
    let out = tool(&pod, &[SEED_ARGS, extra].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    pod
}

fn iptables_restore(pod: &Pod, program: &str, input: &str) {
    let mut child = pod.cmd(program).arg("--noflush").stdin(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{program} refused:\n{input}");
}

fn nft_load(pod: &Pod, script: &str) {
    let path = std::env::temp_dir().join(format!("{}.nft", unique("logged")));
    std::fs::write(&path, script).unwrap();
    run_ok(pod.cmd("nft").arg("-f").arg(&path));
    std::fs::remove_file(&path).unwrap();
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn template_args_program_what_the_direct_invocation_does_and_log_it() {
    require_netns!();
    let want = reference("10.44.0.5/24", &[]);
    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool(&pod, TEMPLATE);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pod.iptables_save(false), want.iptables_save(false));
    let log = stderr(&out);
    assert!(stdout(&out).is_empty(), "the log goes to stderr: {}", stdout(&out));
    for line in [
        "\tinfo\tIstio config:\n",
        "\nPROXY_PORT=15001\n",
        "\nPROXY_UID=1337\n",
        "\nPROXY_GID=1337\n",
        "\nINBOUND_INTERCEPTION_MODE=REDIRECT\n",
        "\nINBOUND_PORTS_INCLUDE=*\n",
        "\nINBOUND_PORTS_EXCLUDE=15090,15021,15020\n",
        "\nOUTBOUND_IP_RANGES_INCLUDE=*\n",
        "\nOUTBOUND_IP_RANGES_EXCLUDE=\n",
        "\nENABLE_INBOUND_IPV6=false\n",
        "\nNATIVE_NFTABLES=false\n",
        "\tinfo\tRunning iptables restore with: iptables-nft-restore and the following input:\n*nat\n",
        "\n-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN\n",
        "\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n",
        "\tinfo\tcapture rules installed\n",
    ] {
        assert!(log.contains(line), "{line:?} missing from the log:\n{log}");
    }
    assert!(!log.contains("\tdebug\t"), "{log}");

    let again = tool(&pod, TEMPLATE);
    assert!(again.status.success(), "{}", stderr(&again));
    let log = stderr(&again);
    assert!(log.contains("\tinfo\tcapture rules already in place; nothing changed\n"), "{log}");
    assert!(log.contains("\tinfo\tIstio config:\n") && !log.contains("Running iptables restore"), "{log}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_logged_restore_input_replays_to_the_same_rules() {
    require_netns!();
    let pod = Pod::with_address("fd00:44::5/64");
    let out = tool(&pod, &with(&["-m", "TPROXY", "--log_as_json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let records = json_records(&stderr(&out));
    let replay = Pod::with_address("fd00:44::5/64");
    for (program, v6) in [("iptables-nft-restore", false), ("ip6tables-nft-restore", true)] {
        let inputs = logged_text(&records, &format!("Running iptables restore with: {program} and"));
        assert_eq!(inputs.len(), 1, "one {program} input in {records:?}");
        iptables_restore(&replay, program, inputs[0]);
        assert_eq!(replay.iptables_save(v6), pod.iptables_save(v6), "{program}");
    }
    let routing = logged_text(&records, "Added the routing the capture relies on:");
    assert_eq!(
        routing,
        ["ip rule add fwmark 1337 lookup 133\nip route add local default dev lo table 133\n\
        ip -6 addr add ::6/128 dev lo\nip -6 rule add fwmark 1337 lookup 133\nip -6 route add local default dev lo table 133"]
    );
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn native_nftables_logs_the_script_it_sent_and_the_script_replays() {
    require_netns!();
    let want = reference("10.44.0.5/24", &["--native-nftables"]);
    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool(&pod, &with(&["--native-nftables", "--log_as_json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pod.nft_ruleset(), want.nft_ruleset());
    let records = json_records(&stderr(&out));
    let scripts = logged_text(&records, "nftables rules programmed:");
    assert_eq!(scripts.len(), 1, "{records:?}");
    assert!(scripts[0].starts_with("add table inet istio-proxy-nat\n"), "{}", scripts[0]);
    let replay = Pod::with_address("10.44.0.5/24");
    nft_load(&replay, scripts[0]);
    assert_eq!(replay.nft_ruleset(), pod.nft_ruleset());
    assert_eq!(records.last().unwrap()["msg"], "capture rules installed");

    // A reconcile logs the replacing transaction: replayed over the old tables, it leaves what
    // the tool left.
    let tproxy = with(&["--native-nftables", "--log_as_json", "-m", "TPROXY", "--reconcile"]);
    let out = tool(&pod, &tproxy);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = json_records(&stderr(&out));
    let scripts = logged_text(&records, "nftables rules programmed:");
    assert!(scripts[0].starts_with("add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n"), "{}", scripts[0]);
    nft_load(&replay, scripts[0]);
    assert_eq!(replay.nft_ruleset(), pod.nft_ruleset());
    assert_eq!(records.last().unwrap()["msg"], "drifted capture rules replaced");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn debug_shows_the_state_read_back_and_the_plan() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let debug = with(&["--log_output_level=default:debug"]);
    let first = stderr(&tool(&pod, &debug));
    assert!(first.contains("\tdebug\tIPv4: no table of this family in the kernel, nothing to read\n"), "{first}");
    assert!(first.contains("\nIPv4 plan: nothing of ours yet: install\n"), "{first}");
    let second = stderr(&tool(&pod, &debug));
    assert!(second.contains("\tdebug\tIPv4: current state (iptables-nft-save):\n*nat\n"), "{second}");
    assert!(second.contains("\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"), "{second}");
    assert!(second.contains("\nIPv4 plan: our rules are exactly as planned: nothing to send\n"), "{second}");

    let pod = Pod::with_address("10.44.0.5/24");
    let native = with(&["--log_output_level=debug", "--native-nftables"]);
    let first = stderr(&tool(&pod, &native));
    assert!(first.contains("\tdebug\tnftables: our tables as read back:\nnone of our tables exists\n"), "{first}");
    assert!(first.contains("\tdebug\tnftables: none of our tables exists: create them\n"), "{first}");
    let second = stderr(&tool(&pod, &native));
    assert!(second.contains("\ntable inet istio-proxy-nat flags 0x0\n"), "{second}");
    assert!(second.contains("\n  chain istio-output { regular }\n    [ "), "{second}");
    assert!(second.contains("\tdebug\tnftables: our tables are exactly as planned: nothing to send\n"), "{second}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn every_global_flag_is_accepted_and_the_meaningful_ones_honoured() {
    require_netns!();
    let dir = std::env::temp_dir().join(unique("logs"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("init.log");
    let rotate = dir.join("rotate.log");
    let (file_arg, rotate_arg) = (format!("--log_target={}", file.display()), format!("--log_rotate={}", rotate.display()));
    // (extra flags, where the log must be: stdout, stderr, the files; a line it must hold)
    type Case<'a> = (Vec<&'a str>, [bool; 4], &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--log_target=stdout"], [true, false, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--log_target", "stderr"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec![&file_arg], [false, false, true, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--log_target=stderr", &file_arg], [false, true, true, false], "\tinfo\tIstio config:\n"),
        (
            vec![&rotate_arg, "--log_rotate_max_age=7", "--log_rotate_max_size", "100", "--log_rotate_max_backups=3"],
            [false, true, false, true],
            "\tinfo\tcapture rules installed\n",
        ),
        (vec!["--log_caller=default"], [false, true, false, false], "\tistio-iptables/src/report.rs:"),
        (vec!["--log_caller=ads,all"], [false, true, false, false], "\tistio-iptables/src/report.rs:"),
        (vec!["--log_caller=ads"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--log_as_json=true"], [false, true, false, false], "{\"level\":\"info\",\"time\":"),
        (vec!["--log_as_json=false"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--log_stacktrace_level=default:error"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--vklog=9"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--vklog", "0"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
        (vec!["--log_output_level=ads:debug,default:warn"], [false, false, false, false], ""),
        (vec!["--log_output_level=error"], [false, false, false, false], ""),
        (vec!["--log_output_level=default:none"], [false, false, false, false], ""),
        (vec!["--log_output_level=default:debug,all:info"], [false, true, false, false], "\tinfo\tcapture rules installed\n"),
    ];
    for (extra, [on_stdout, on_stderr, in_file, in_rotate], line) in cases {
        let pod = Pod::with_address("10.44.0.5/24");
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&rotate);
        let out = tool(&pod, &with(&extra));
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
        assert!(pod.rules(false).iter().any(|r| r == "-A OUTPUT -j ISTIO_OUTPUT"), "{extra:?}: rules programmed");
        let file_text = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
        let places = [
            ("stdout", stdout(&out), on_stdout),
            ("stderr", stderr(&out), on_stderr),
            ("--log_target file", file_text(&file), in_file),
            ("--log_rotate file", file_text(&rotate), in_rotate),
        ];
        for (name, text, expected) in places {
            if expected {
                assert!(text.contains(line), "{extra:?}: {line:?} missing from {name}:\n{text}");
            } else {
                assert!(text.is_empty(), "{extra:?}: nothing expected on {name}:\n{text}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn errors_are_logged_records_too() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    let out = tool(&pod, &with(&["--log_as_json", "-b", "80,99999"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let records = json_records(&stderr(&out));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["level"], "error");
    assert!(records[0]["msg"].as_str().unwrap().contains("99999"), "{records:?}");
    assert!(pod.rules(false).is_empty());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn bad_global_flag_values_are_usage_errors_naming_the_flag() {
    require_netns!();
    let pod = Pod::with_address("10.44.0.5/24");
    for (bad, named) in [
        ("--log_output_level=default:loud", "--log_output_level"),
        ("--log_output_level=a:b:c", "--log_output_level"),
        ("--log_output_level=default:info,", "--log_output_level"),
        ("--log_as_json=maybe", "--log_as_json"),
        ("--log_stacktrace_level=sometimes", "--log_stacktrace_level"),
        ("--vklog=x", "--vklog"),
        ("--log_target=", "--log_target"),
        ("--log_target=/nonexistent-directory/init.log", "--log_target"),
        ("--log_rotate=/nonexistent-directory/init.log", "--log_rotate"),
        ("--log_rotate_max_size=big", "--log_rotate_max_size"),
        ("--log_rotate_max_age=1d", "--log_rotate_max_age"),
        ("--log_rotate_max_backups=", "--log_rotate_max_backups"),
    ] {
        let out = tool(&pod, &with(&[bad]));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{bad} should name {named}: {}", stderr(&out));
    }
    assert!(pod.rules(false).is_empty(), "nothing programmed: {:?}", pod.rules(false));
}
