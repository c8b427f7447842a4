//! A test that needs network namespaces never passes where it cannot run: tests/build.rs sets the cfg
//! `netns_unavailable` there (outside CI), each such test carries `IGNORE` so the runner reports it as ignored,
//! and `require_netns!` fails it where it runs anyway (CI, or a build made where namespaces worked).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capture_tests::{can_run, require_netns, run_ok};

/// The attribute every test that reaches `require_netns!` carries, word for word.
const IGNORE: &str = r#"#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]"#;

struct Function {
    name: String,
    attributes: Vec<String>,
    body: String,
}

/// The functions of a rustfmt-laid-out source file: each ends at the first `}` line at its own indentation.
fn functions(source: &str) -> Vec<Function> {
    let lines: Vec<&str> = source.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let Some(rest) = ["fn ", "pub fn ", "pub(crate) fn ", "async fn "].iter().find_map(|p| code.strip_prefix(p)) else {
            continue;
        };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let attributes = lines[..start]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| l.starts_with("#[") || l.starts_with("//"))
            .filter(|l| l.starts_with("#["))
            .map(str::to_string)
            .collect();
        let close = format!("{}}}", &line[..line.len() - code.len()]);
        let end = if code.ends_with('}') || code.ends_with(';') {
            start
        } else {
            lines[start..].iter().position(|l| *l == close).map_or(lines.len() - 1, |n| start + n)
        };
        found.push(Function { name, attributes, body: lines[start..=end].join("\n") });
    }
    found
}

/// True when `body` calls `name(...)` (a function or method of that name).
fn calls(body: &str, name: &str) -> bool {
    body.match_indices(&format!("{name}("))
        .any(|(at, _)| !body[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') && !body[..at].ends_with("fn "))
}

/// What is wrong in one file: tests that reach `require_netns!` (directly or through helpers of the same
/// file) without `IGNORE`, and tests marked with `IGNORE` that never reach it.
fn problems(file: &str, source: &str) -> Vec<String> {
    let functions = functions(source);
    let invokes = |f: &&Function| f.body.lines().any(|l| l.trim_start().starts_with("require_netns!("));
    let mut needing: HashSet<&str> = functions.iter().filter(invokes).map(|f| f.name.as_str()).collect();
    loop {
        let callers: Vec<&str> = functions
            .iter()
            .filter(|f| !needing.contains(f.name.as_str()) && needing.iter().any(|n| calls(&f.body, n)))
            .map(|f| f.name.as_str())
            .collect();
        if callers.is_empty() {
            break;
        }
        needing.extend(callers);
    }
    let mut found = Vec::new();
    for f in functions.iter().filter(|f| f.attributes.iter().any(|a| a == "#[test]")) {
        match (needing.contains(f.name.as_str()), f.attributes.iter().any(|a| a == IGNORE)) {
            (true, false) => found.push(format!("{file}: {} reaches require_netns! but lacks {IGNORE}", f.name)),
            (false, true) => found.push(format!("{file}: {} is marked {IGNORE} but never reaches require_netns!", f.name)),
            _ => {}
        }
    }
    found
}

#[test]
fn every_test_that_needs_namespaces_is_marked_to_be_ignored_where_it_cannot_run() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut found = Vec::new();
    let mut marked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).unwrap();
            marked += source.lines().filter(|l| l.trim() == IGNORE).count();
            found.extend(problems(&path.file_name().unwrap().to_string_lossy(), &source));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    assert!(marked > 50, "only {marked} tests marked: is {} still the tests' directory?", dir.display());
}

#[test]
fn the_scan_finds_unmarked_tests_through_helpers_and_stray_marks() {
    let source = format!(
        "fn helper() {{\n    require_netns!();\n}}\n\nfn outer_helper() {{\n    helper();\n}}\n\n\
         #[test]\nfn direct() {{\n    require_netns!();\n}}\n\n#[test]\nfn through_helpers() {{\n    outer_helper();\n}}\n\n\
         #[test]\n{IGNORE}\nfn marked() {{\n    helper();\n}}\n\n#[test]\n{IGNORE}\nfn stray() {{\n    assert!(true);\n}}\n\n\
         #[test]\nfn pure() {{\n    assert_eq!(not_helper(), 1);\n}}\n"
    );
    let found = problems("sample.rs", &source);
    let names: Vec<&str> = found.iter().map(|p| p.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(names, ["direct", "through_helpers", "stray"], "{found:#?}");
}

/// The build's probe is stale when the tests run as another user than the one who built them: either
/// namespace tests are ignored though they could run, or they fail though they were meant to be ignored.
#[test]
fn the_build_probe_matches_this_run() {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert_eq!(
        cfg!(netns_unavailable),
        !ci && !can_run(),
        "tests/build.rs decided for another user or CI setting than this run's: rebuild (touch tests/build.rs)"
    );
}

/// `setpriv` to nobody (uid and gid 65534, no groups, and so no capabilities).
fn as_nobody(program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(program).env_remove("CI");
    command
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs itself (this test binary, this test) as nobody: the run fails with the reason, it does not pass.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn without_root_this_test_fails_instead_of_passing() {
    require_netns!();
    let this = std::env::current_exe().unwrap();
    let output = as_nobody(&this).args(["--exact", "without_root_this_test_fails_instead_of_passing"]).output().unwrap();
    let (out, err) = (stdout(&output), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(101), "{out}{err}");
    assert!(out.contains("needs root and network namespaces") && out.contains("1 failed"), "{out}{err}");
}

/// This package's build script binary (the newest, if older builds left others beside it).
fn build_script() -> PathBuf {
    let build_dir = Path::new(env!("OUT_DIR")).parent().and_then(Path::parent).expect("OUT_DIR is target/*/build/NAME/out");
    std::fs::read_dir(build_dir)
        .unwrap()
        .map(|e| e.unwrap().path().join("build-script-build"))
        .filter(|p| p.parent().unwrap().file_name().unwrap().to_string_lossy().starts_with("capture-tests-") && p.exists())
        .max_by_key(|p| p.metadata().unwrap().modified().unwrap())
        .unwrap_or_else(|| panic!("no capture-tests build script in {}", build_dir.display()))
}

/// What the build script decides for a user without root: namespace tests ignored, unless CI is set.
#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_build_marks_namespace_tests_ignored_for_a_user_without_root_unless_ci_is_set() {
    require_netns!();
    const MARK: &str = "cargo:rustc-cfg=netns_unavailable";
    let script = build_script();
    let nobody = stdout(&run_ok(&mut as_nobody(&script)));
    assert!(nobody.lines().any(|l| l == MARK), "{nobody}");
    for ci in ["true", "1"] {
        let in_ci = stdout(&run_ok(as_nobody(&script).env("CI", ci)));
        assert!(!in_ci.contains(MARK), "CI={ci}: {in_ci}");
    }
    let nobody_ci_false = stdout(&run_ok(as_nobody(&script).env("CI", "false")));
    assert!(nobody_ci_false.contains(MARK), "CI=false: {nobody_ci_false}");
    let root = stdout(&run_ok(Command::new(&script).env_remove("CI")));
    assert!(!root.contains(MARK), "{root}");
}
