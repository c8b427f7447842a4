//! pilot-agent's global logging flags and the log they configure, in Istio's format: console
//! lines `time<TAB>level<TAB>[caller<TAB>]message`, or with `--log_as_json` one JSON object per
//! line with Istio's field names (`level`, `time`, `caller`, `msg`). Istio's tool logs on its
//! default scope, which zap names nowhere, so neither form carries a `scope`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::panic::Location;
use std::time::{SystemTime, UNIX_EPOCH};

pub use capture_lib::log_level::Level;
use capture_lib::Detail;
use clap::{ArgAction, Args};

/// Istio's `<scope>:<level>,<scope>:<level>,...` (a bare level is the `default` scope's), applied
/// left to right over `start`, as pkg/log does: `all` sets every scope, and scopes other than
/// `default` (pilot-agent's `ads`, `cache`, ...) are accepted and leave this tool's level alone.
/// An empty value changes nothing. Returns the level of the `default` scope, the one we log on.
fn scoped_level(text: &str, start: Level) -> Result<Level, String> {
    if text.is_empty() {
        return Ok(start);
    }
    text.split(',').try_fold(start, |level, entry| {
        let (scope, name) = match entry.split(':').collect::<Vec<_>>()[..] {
            [name] => ("default", name),
            [scope, name] => (scope, name),
            _ => return Err(format!("{entry:?} is not <scope>:<level>")),
        };
        let parsed =
            Level::named(name).ok_or_else(|| format!("{name:?} is not a level (debug, info, warn, error, fatal or none)"))?;
        Ok(if scope == "default" || scope == "all" { parsed } else { level })
    })
}

fn output_level(text: &str) -> Result<Level, String> {
    scoped_level(text, Level::Info)
}

/// Checked like the output level; stack traces are Go's, and this tool has none to print.
fn stacktrace_level(text: &str) -> Result<Level, String> {
    scoped_level(text, Level::None)
}

/// Whether a `--log_caller` scope list names this tool's scope.
fn caller_scopes(text: &str) -> Result<bool, String> {
    Ok(text.split(',').any(|scope| scope == "default" || scope == "all"))
}

fn log_path(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("an empty path (use stdout, stderr or a file path)".to_string());
    }
    Ok(text.to_string())
}

/// pilot-agent's global flags (pkg/log/options.go, pkg/log/klog.go), which Istio's injector
/// may put after the `istio-iptables` subcommand. Each value is checked as pilot-agent checks it.
#[derive(Debug, Args)]
#[group(skip)]
#[command(next_help_heading = "Logging (pilot-agent's global flags)")]
pub struct LogFlags {
    /// Minimum level of messages to output: debug, info, warn, error, fatal or none, or per scope
    /// <scope>:<level>,... as pilot-agent takes it (this tool logs on scope `default`; `all` sets
    /// every scope; other scopes are accepted and change nothing here). info shows the settings and
    /// the rules applied, debug also the state read back and the plan.
    #[arg(long = "log_output_level", value_name = "LEVELS", default_value = "default:info", value_parser = output_level)]
    pub log_output_level: Level,
    /// One JSON object per line with Istio's field names (level, time, caller, msg).
    #[arg(long = "log_as_json", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_syntax::parse_bool)]
    pub log_as_json: bool,
    /// Where the log goes: stdout, stderr or a file (appended to, created if missing); repeat the
    /// flag for several. Istio's default is stdout; ours is stderr, so that stdout carries only
    /// --dry-run's output.
    #[arg(long = "log_target", value_name = "PATH", default_value = "stderr", action = ArgAction::Append,
          value_parser = log_path)]
    pub log_target: Vec<String>,
    /// Comma list of scopes whose messages carry their source location (`default` or `all`
    /// for this tool's).
    #[arg(long = "log_caller", value_name = "SCOPES", default_value = "", hide_default_value = true,
          action = ArgAction::Set, value_parser = caller_scopes)]
    pub log_caller: bool,
    /// Accepted and checked like --log_output_level; no stack traces are printed.
    #[arg(long = "log_stacktrace_level", value_name = "LEVELS", default_value = "default:none",
          value_parser = stacktrace_level)]
    pub log_stacktrace_level: Level,
    /// Verbosity of the Kubernetes client library pilot-agent embeds (an integer): accepted and
    /// checked; this tool has no such client.
    #[arg(long = "vklog", value_name = "LEVEL", default_value = "0", value_parser = clap::value_parser!(i32))]
    pub vklog: i32,
    /// Istio before 1.23: a file the log is also written to (not rotated: a run writes a few lines).
    #[arg(long = "log_rotate", value_name = "PATH", value_parser = log_path)]
    pub log_rotate: Option<String>,
    /// Istio before 1.23: rotation limit; accepted and checked (an integer), no effect.
    #[arg(long = "log_rotate_max_age", value_name = "DAYS", value_parser = clap::value_parser!(i64))]
    pub log_rotate_max_age: Option<i64>,
    /// Istio before 1.23: rotation limit; accepted and checked (an integer), no effect.
    #[arg(long = "log_rotate_max_size", value_name = "MB", value_parser = clap::value_parser!(i64))]
    pub log_rotate_max_size: Option<i64>,
    /// Istio before 1.23: rotation limit; accepted and checked (an integer), no effect.
    #[arg(long = "log_rotate_max_backups", value_name = "COUNT", value_parser = clap::value_parser!(i64))]
    pub log_rotate_max_backups: Option<i64>,
}

impl LogFlags {
    /// What the capture report must describe for this log: the rules sent at info, also the
    /// state read and the plan at debug, nothing more below info (no text is rendered for nothing).
    pub fn detail(&self) -> Detail {
        match self.log_output_level {
            Level::Debug => Detail::Trace,
            Level::Info => Detail::Sent,
            _ => Detail::Outcome,
        }
    }
}

/// A log target that cannot be opened: a usage error naming the flag.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: cannot open {path}: {source}")]
pub struct OpenError {
    flag: &'static str,
    path: String,
    source: io::Error,
}

enum Target {
    Stdout,
    Stderr,
    File(File),
}

impl Target {
    fn open(flag: &'static str, path: &str) -> Result<Target, OpenError> {
        Ok(match path {
            "stdout" => Target::Stdout,
            "stderr" => Target::Stderr,
            // As zap opens its sinks.
            _ => Target::File(OpenOptions::new().append(true).create(true).open(path).map_err(|source| OpenError {
                flag,
                path: path.to_string(),
                source,
            })?),
        })
    }

    /// One write where the stream allows it, so that concurrent writers never interleave.
    fn write(&self, records: &[u8]) {
        // A log that cannot be written must not change what the run does or its exit code.
        let _ = match self {
            Target::Stdout => io::stdout().lock().write_all(records).and_then(|()| io::stdout().flush()),
            Target::Stderr => io::stderr().lock().write_all(records),
            Target::File(file) => (&*file).write_all(records),
        };
    }
}

/// The configured log: where records go, from which level, in which form.
///
/// Records are collected and written once, when the logger is dropped at the end of the run:
/// each write to a pipe wakes its reader (the container runtime), and one write per record
/// cost a tenth of a native nftables run. Every wait of a run is bounded (the lock, the
/// validation probe), so nothing is held back for long.
pub struct Logger {
    level: Level,
    json: bool,
    caller: bool,
    targets: Vec<Target>,
    records: RefCell<String>,
}

impl Logger {
    pub fn open(flags: &LogFlags) -> Result<Logger, OpenError> {
        let mut targets = Vec::new();
        for path in &flags.log_target {
            targets.push(Target::open("--log_target", path)?);
        }
        if let Some(path) = &flags.log_rotate {
            targets.push(Target::open("--log_rotate", path)?);
        }
        Ok(Logger::new(flags.log_output_level, flags.log_as_json, flags.log_caller, targets))
    }

    fn new(level: Level, json: bool, caller: bool, targets: Vec<Target>) -> Logger {
        Logger { level, json, caller, targets, records: RefCell::default() }
    }

    /// Whether records of `level` are written: callers skip building text nobody will read.
    pub fn enabled(&self, level: Level) -> bool {
        level != Level::None && level <= self.level
    }

    #[track_caller]
    pub fn debug(&self, message: &str) {
        self.log(Level::Debug, message);
    }

    #[track_caller]
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    #[track_caller]
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    #[track_caller]
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }

    #[track_caller]
    fn log(&self, level: Level, message: &str) {
        if !self.enabled(level) {
            return;
        }
        // Called here, not through a closure, so that it names the line that logged.
        let caller = if self.caller { Some(Location::caller()) } else { None };
        let record = render(level, &timestamp(SystemTime::now()), caller, message, self.json);
        self.records.borrow_mut().push_str(&record);
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        let records = self.records.take();
        if !records.is_empty() {
            self.targets.iter().for_each(|target| target.write(records.as_bytes()));
        }
    }
}

/// One record, newline-terminated, with fields in zap's order.
fn render(level: Level, time: &str, caller: Option<&Location>, message: &str, json: bool) -> String {
    let mut out = String::with_capacity(message.len() + 64);
    if json {
        let quote = |s: &str| serde_json::to_string(s).expect("a string always serializes");
        let _ = write!(out, r#"{{"level":"{}","time":"{time}""#, level.name());
        if let Some(caller) = caller {
            let _ = write!(out, r#","caller":{}"#, quote(&format!("{}:{}", caller.file(), caller.line())));
        }
        let _ = writeln!(out, r#","msg":{}}}"#, quote(message));
    } else {
        let _ = write!(out, "{time}\t{}\t", level.name());
        if let Some(caller) = caller {
            let _ = write!(out, "{}:{}\t", caller.file(), caller.line());
        }
        out.push_str(message);
        out.push('\n');
    }
    out
}

/// Istio's timestamp: UTC, microseconds, `2006-01-02T15:04:05.000000Z`.
fn timestamp(now: SystemTime) -> String {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_date(seconds / 86_400);
    let time_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        time_of_day / 3600,
        time_of_day / 60 % 60,
        time_of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn output_levels_take_istio_syntax() {
        for (text, want) in [
            ("", Level::Info),
            ("debug", Level::Debug),
            ("default:debug", Level::Debug),
            ("default:none", Level::None),
            ("all:warn", Level::Warn),
            ("default:debug,all:error", Level::Error),
            ("all:error,default:debug", Level::Debug),
            ("ads:debug", Level::Info),
            ("default:warn,ads:debug,grpc:none", Level::Warn),
            ("fatal", Level::Fatal),
        ] {
            assert_eq!(output_level(text), Ok(want), "{text:?}");
        }
        assert_eq!(stacktrace_level(""), Ok(Level::None));
    }

    #[test]
    fn bad_output_levels_name_the_bad_part() {
        for (text, named) in [
            ("verbose", "\"verbose\""),
            ("default:trace", "\"trace\""),
            ("default:info,", "\"\""),
            ("a:b:c", "\"a:b:c\""),
            ("Info", "\"Info\""),
            ("default:", "\"\""),
        ] {
            let err = output_level(text).unwrap_err();
            assert!(err.contains(named), "{text:?}: {err}");
        }
    }

    #[test]
    fn caller_is_on_for_default_or_all() {
        assert_eq!(caller_scopes(""), Ok(false));
        assert_eq!(caller_scopes("ads,cache"), Ok(false));
        assert_eq!(caller_scopes("ads,default"), Ok(true));
        assert_eq!(caller_scopes("all"), Ok(true));
    }

    #[test]
    fn threshold_lets_through_its_level_and_more_severe() {
        let logger = |level| Logger::new(level, false, false, Vec::new());
        assert!(logger(Level::Info).enabled(Level::Info) && logger(Level::Info).enabled(Level::Error));
        assert!(!logger(Level::Info).enabled(Level::Debug));
        assert!(logger(Level::Debug).enabled(Level::Debug));
        assert!(!logger(Level::Warn).enabled(Level::Info));
        assert!(!logger(Level::None).enabled(Level::Error) && !logger(Level::Debug).enabled(Level::None));
    }

    #[test]
    fn timestamps_are_utc_microseconds() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.123456Z, a leap day.
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(timestamp(t), "2024-02-29T23:59:59.123456Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400);
        assert_eq!(timestamp(t), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn records_in_zap_field_order() {
        let t = "2024-01-02T03:04:05.000006Z";
        assert_eq!(render(Level::Info, t, None, "a\tb", false), "2024-01-02T03:04:05.000006Z\tinfo\ta\tb\n");
        assert_eq!(
            render(Level::Warn, t, None, "two\nlines \"quoted\"", true),
            "{\"level\":\"warn\",\"time\":\"2024-01-02T03:04:05.000006Z\",\"msg\":\"two\\nlines \\\"quoted\\\"\"}\n"
        );
        let here = Location::caller();
        let json = render(Level::Debug, t, Some(here), "m", true);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["caller"], format!("{}:{}", here.file(), here.line()));
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["level", "time", "caller", "msg"]);
        let text = render(Level::Error, t, Some(here), "m", false);
        assert_eq!(text, format!("{t}\terror\t{}:{}\tm\n", here.file(), here.line()));
    }
}
