//! Istio's log levels (its pkg/log), which both front ends take: istio-iptables'
//! `--log_output_level`, the CNI plugin's `plugin_log_level`.

/// Istio's levels, least to most verbose: a threshold lets through every record at or below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    None,
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    /// Every level, least verbose first.
    pub const ALL: [Level; 6] = [Level::None, Level::Fatal, Level::Error, Level::Warn, Level::Info, Level::Debug];

    /// The level Istio calls `name`.
    pub fn named(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|level| level.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Fatal => "fatal",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_by_verbosity() {
        for level in Level::ALL {
            assert_eq!(Level::named(level.name()), Some(level));
        }
        assert_eq!(Level::named("verbose"), None);
        assert!(Level::None < Level::Error && Level::Warn < Level::Info && Level::Info < Level::Debug);
    }
}
