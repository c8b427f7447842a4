//! Go's grammar for flag and environment values, as Istio's Go binaries parse them: durations
//! (`time.ParseDuration`) and booleans (`strconv.ParseBool`). Every binary of ours parses these
//! values here, so `1m30s` or `T` means the same thing to each of them, and an out-of-range value
//! is an error, never a panic or a wrap-around.

#![deny(unsafe_code)]

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GoSyntaxError {
    #[error("{0:?} is not a duration (a number and a unit: ns, us, ms, s, m, h; e.g. 5s, 500ms, 1m30s)")]
    Duration(String),
    #[error("{0:?} is a negative duration")]
    NegativeDuration(String),
    #[error("{0:?} is too long a duration (Go's limit is about 292 years)")]
    DurationOverflow(String),
    #[error("{0:?} is not a boolean (use true or false)")]
    Bool(String),
}

/// Go's `time.Duration` holds signed 64-bit nanoseconds: longer values are refused, as Go does.
const MAX_NANOS: u128 = i64::MAX as u128;

/// `time.ParseDuration`: a sequence of decimal numbers, each with an optional fraction and a
/// unit (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), such as `300ms` or `1h45m`; `0` alone needs
/// no unit. Negative durations, which Go accepts, mean nothing for a timeout and are refused.
pub fn parse_duration(text: &str) -> Result<Duration, GoSyntaxError> {
    let invalid = || GoSyntaxError::Duration(text.to_string());
    let rest = match text.strip_prefix('-') {
        Some(unsigned) if unsigned != "0" => return Err(GoSyntaxError::NegativeDuration(text.to_string())),
        Some(unsigned) => unsigned,
        None => text.strip_prefix('+').unwrap_or(text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    let mut rest = rest;
    while !rest.is_empty() {
        let (whole, after_whole) = split_digits(rest);
        let (fraction, after_number) = match after_whole.strip_prefix('.') {
            Some(after_dot) => split_digits(after_dot),
            None => ("", after_whole),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(invalid());
        }
        let unit_len = after_number.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(after_number.len());
        let nanos_per_unit: u128 = match &after_number[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(invalid()),
        };
        let overflow = || GoSyntaxError::DurationOverflow(text.to_string());
        let mut value: u128 = 0;
        for digit in whole.bytes() {
            value = value.checked_mul(10).and_then(|v| v.checked_add(u128::from(digit - b'0'))).ok_or_else(overflow)?;
            if value > MAX_NANOS {
                return Err(overflow());
            }
        }
        // The fraction is truncated to whole nanoseconds, as Go does.
        let mut fraction_nanos: u128 = 0;
        let mut scale = nanos_per_unit;
        for digit in fraction.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            fraction_nanos += u128::from(digit - b'0') * scale;
        }
        total = value
            .checked_mul(nanos_per_unit)
            .and_then(|v| v.checked_add(fraction_nanos))
            .and_then(|v| v.checked_add(total))
            .filter(|&v| v <= MAX_NANOS)
            .ok_or_else(overflow)?;
        rest = &after_number[unit_len..];
    }
    let total = u64::try_from(total).map_err(|_| GoSyntaxError::DurationOverflow(text.to_string()))?;
    Ok(Duration::from_nanos(total))
}

/// `strconv.ParseBool`.
pub fn parse_bool(text: &str) -> Result<bool, GoSyntaxError> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(GoSyntaxError::Bool(other.to_string())),
    }
}

fn split_digits(text: &str) -> (&str, &str) {
    text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_go_syntax() {
        for (text, expected) in [
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("+5s", Duration::from_secs(5)),
            ("1m30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("10μs", Duration::from_micros(10)),
            ("1h2m3s4ms5us6ns", Duration::new(3723, 4_005_006)),
            ("1.0000000001s", Duration::from_secs(1)),
            ("2562047h47m16.854775807s", Duration::from_nanos(i64::MAX as u64)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_the_value() {
        for text in ["", "5", "s", ".s", "5x", "1m30", "5 s", " 5s", "1..5s"] {
            assert_eq!(parse_duration(text), Err(GoSyntaxError::Duration(text.into())), "{text}");
        }
        assert_eq!(parse_duration("-5s"), Err(GoSyntaxError::NegativeDuration("-5s".into())));
        for text in ["4000000000000000h", "99999999999999999999s", "2562047h47m16.854775808s", "9223372036854775808ns"] {
            assert_eq!(parse_duration(text), Err(GoSyntaxError::DurationOverflow(text.into())), "{text}");
        }
        assert!(parse_duration("5x").unwrap_err().to_string().contains("\"5x\""));
    }

    #[test]
    fn booleans_in_go_syntax() {
        for text in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(text), Ok(true));
        }
        for text in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(text), Ok(false));
        }
        assert_eq!(parse_bool("yes"), Err(GoSyntaxError::Bool("yes".into())));
    }
}
