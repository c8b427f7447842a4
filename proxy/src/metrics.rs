//! Counters for both traffic paths, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Why an accepted connection was closed without being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its original destination is one of the proxy's own listeners.
    Loop,
    /// `--max-connections` were already in flight.
    Limit,
}

/// Upper bounds of the connect-latency buckets, in seconds.
const CONNECT_BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0];

/// Picks one counter out of a direction's set.
type Field = fn(&PathMetrics) -> &AtomicU64;

/// The counters of one direction.
#[derive(Default)]
pub struct PathMetrics {
    connections: AtomicU64,
    active: AtomicU64,
    /// Client to original destination.
    bytes_upstream: AtomicU64,
    /// Original destination to client.
    bytes_downstream: AtomicU64,
    connect_errors: AtomicU64,
    refused_loop: AtomicU64,
    refused_limit: AtomicU64,
    connect_buckets: [AtomicU64; CONNECT_BUCKETS.len()],
    connect_count: AtomicU64,
    connect_sum_nanos: AtomicU64,
}

impl PathMetrics {
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::Loop => &self.refused_loop,
            Refusal::Limit => &self.refused_limit,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn connect_failed(&self) {
        self.connect_errors.fetch_add(1, Relaxed);
    }

    pub fn connected_in(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(bucket) = CONNECT_BUCKETS.iter().position(|&bound| seconds <= bound) {
            self.connect_buckets[bucket].fetch_add(1, Relaxed);
        }
        self.connect_count.fetch_add(1, Relaxed);
        self.connect_sum_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// The running byte totals the relay adds to: (client → destination, destination → client).
    pub fn byte_counters(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.bytes_upstream, &self.bytes_downstream)
    }
}

/// Decrements the active-connections gauge when the connection ends, however it ends.
pub struct Active {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.metrics.path(self.direction).active.fetch_sub(1, Relaxed);
    }
}

#[derive(Default)]
pub struct Metrics {
    inbound: PathMetrics,
    outbound: PathMetrics,
}

impl Metrics {
    /// Counts an accepted connection; it stays active until the guard is dropped.
    pub fn accepted(self: &Arc<Self>, direction: Direction) -> Active {
        let path = self.path(direction);
        path.connections.fetch_add(1, Relaxed);
        path.active.fetch_add(1, Relaxed);
        Active { metrics: self.clone(), direction }
    }

    pub fn path(&self, direction: Direction) -> &PathMetrics {
        match direction {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let paths = [(Direction::Inbound.label(), &self.inbound), (Direction::Outbound.label(), &self.outbound)];
        let mut out = String::new();
        let simple: [(&str, &str, &str, Field); 3] = [
            ("capture_proxy_connections_total", "counter", "Connections accepted from the capture rules.", |p| &p.connections),
            ("capture_proxy_connections_active", "gauge", "Connections accepted and not yet closed.", |p| &p.active),
            ("capture_proxy_connect_errors_total", "counter", "Upstream connections that failed or timed out.", |p| {
                &p.connect_errors
            }),
        ];
        for (name, kind, help, field) in simple {
            header(&mut out, name, kind, help);
            for (direction, path) in paths {
                sample(&mut out, name, &[("direction", direction)], field(path).load(Relaxed));
            }
        }

        let name = "capture_proxy_bytes_total";
        header(&mut out, name, "counter", "Bytes relayed; flow upstream is client to destination, downstream the reverse.");
        for (direction, path) in paths {
            for (flow, bytes) in [("upstream", &path.bytes_upstream), ("downstream", &path.bytes_downstream)] {
                sample(&mut out, name, &[("direction", direction), ("flow", flow)], bytes.load(Relaxed));
            }
        }

        let name = "capture_proxy_connections_refused_total";
        header(
            &mut out,
            name,
            "counter",
            "Accepted connections reset unforwarded: a loop back into the proxy, or over --max-connections.",
        );
        for (direction, path) in paths {
            for (reason, count) in [("loop", &path.refused_loop), ("limit", &path.refused_limit)] {
                sample(&mut out, name, &[("direction", direction), ("reason", reason)], count.load(Relaxed));
            }
        }

        let name = "capture_proxy_connect_duration_seconds";
        header(&mut out, name, "histogram", "Time to establish upstream connections.");
        for (direction, path) in paths {
            let bucket = format!("{name}_bucket");
            let mut cumulative = 0;
            for (bound, count) in CONNECT_BUCKETS.iter().zip(&path.connect_buckets) {
                cumulative += count.load(Relaxed);
                sample(&mut out, &bucket, &[("direction", direction), ("le", &bound.to_string())], cumulative);
            }
            let total = path.connect_count.load(Relaxed);
            sample(&mut out, &bucket, &[("direction", direction), ("le", "+Inf")], total);
            let sum = path.connect_sum_nanos.load(Relaxed) as f64 / 1e9;
            sample(&mut out, &format!("{name}_sum"), &[("direction", direction)], sum);
            sample(&mut out, &format!("{name}_count"), &[("direction", direction)], total);
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    let labels: Vec<String> = labels.iter().map(|(key, value)| format!("{key}=\"{value}\"")).collect();
    let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of<'a>(text: &'a str, series: &str) -> &'a str {
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    }

    #[test]
    fn renders_counts_per_direction() {
        let metrics = Arc::new(Metrics::default());
        let guard = metrics.accepted(Direction::Inbound);
        drop(metrics.accepted(Direction::Inbound));
        let inbound = metrics.path(Direction::Inbound);
        let (up, down) = inbound.byte_counters();
        up.fetch_add(10, Relaxed);
        down.fetch_add(32, Relaxed);
        metrics.path(Direction::Outbound).connect_failed();
        metrics.path(Direction::Outbound).refused(Refusal::Loop);

        let text = metrics.render();
        assert_eq!(value_of(&text, r#"capture_proxy_connections_total{direction="inbound"}"#), "2");
        assert_eq!(value_of(&text, r#"capture_proxy_connections_total{direction="outbound"}"#), "0");
        assert_eq!(value_of(&text, r#"capture_proxy_connections_active{direction="inbound"}"#), "1");
        assert_eq!(value_of(&text, r#"capture_proxy_bytes_total{direction="inbound",flow="upstream"}"#), "10");
        assert_eq!(value_of(&text, r#"capture_proxy_bytes_total{direction="inbound",flow="downstream"}"#), "32");
        assert_eq!(value_of(&text, r#"capture_proxy_connect_errors_total{direction="outbound"}"#), "1");
        assert_eq!(value_of(&text, r#"capture_proxy_connections_refused_total{direction="outbound",reason="loop"}"#), "1");
        drop(guard);
        assert_eq!(value_of(&metrics.render(), r#"capture_proxy_connections_active{direction="inbound"}"#), "0");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        let outbound = metrics.path(Direction::Outbound);
        outbound.connected_in(Duration::from_micros(80));
        outbound.connected_in(Duration::from_millis(3));
        outbound.connected_in(Duration::from_secs(30));
        let text = metrics.render();
        let bucket = |le: &str| {
            value_of(&text, &format!(r#"capture_proxy_connect_duration_seconds_bucket{{direction="outbound",le="{le}"}}"#))
                .to_string()
        };
        assert_eq!(bucket("0.0001"), "1");
        assert_eq!(bucket("0.0025"), "1");
        assert_eq!(bucket("0.005"), "2");
        assert_eq!(bucket("10"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert_eq!(value_of(&text, r#"capture_proxy_connect_duration_seconds_count{direction="outbound"}"#), "3");
        let sum: f64 = value_of(&text, r#"capture_proxy_connect_duration_seconds_sum{direction="outbound"}"#).parse().unwrap();
        assert!((sum - 30.00308).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let text = Metrics::default().render();
        // The families are those the samples belong to (a histogram's series carry suffixes).
        let families: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .map(|series| ["_bucket", "_sum", "_count"].iter().fold(series, |s, suffix| s.strip_suffix(suffix).unwrap_or(s)))
            .collect();
        assert!(families.len() >= 6, "{families:?}");
        for name in families {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
            assert_eq!(text.matches(&format!("# HELP {name} ")).count(), 1, "{name}");
        }
        let declared = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(declared, text.lines().filter(|l| l.starts_with("# HELP ")).count());
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("capture_proxy_")), "{text}");
    }
}
