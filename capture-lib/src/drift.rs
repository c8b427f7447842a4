//! How the capture found in a namespace differs from the one requested, in one shape for both
//! backends: the kind of difference, its place (table, chain, position, or set), and the
//! expected and the found, each in its backend's own language (iptables-save lines, nft
//! rules, ip set members).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TableMissing,
    UnexpectedTable,
    TableDiffers,
    ChainMissing,
    UnexpectedChain,
    ChainDiffers,
    SetMissing,
    UnexpectedSet,
    SetDiffers,
    RuleMissing,
    UnexpectedRule,
    RuleDiffers,
}

impl Kind {
    fn words(self) -> &'static str {
        match self {
            Kind::TableMissing => "table missing",
            Kind::UnexpectedTable => "unexpected table",
            Kind::TableDiffers => "table differs",
            Kind::ChainMissing => "chain missing",
            Kind::UnexpectedChain => "unexpected chain",
            Kind::ChainDiffers => "chain differs",
            Kind::SetMissing => "set missing",
            Kind::UnexpectedSet => "unexpected set",
            Kind::SetDiffers => "set differs",
            Kind::RuleMissing => "rule missing",
            Kind::UnexpectedRule => "unexpected rule",
            Kind::RuleDiffers => "rule differs",
        }
    }
}

/// One difference. Shown as `kind: place`, then the expected and the found on lines of their
/// own, indented to sit under an item of a list indented by two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub kind: Kind,
    /// e.g. `table inet istio-proxy-nat, chain istio-output, rule 3`
    pub place: String,
    pub expected: Option<String>,
    pub found: Option<String>,
}

impl Difference {
    pub fn new(kind: Kind, place: impl Into<String>) -> Self {
        Difference { kind, place: place.into(), expected: None, found: None }
    }

    pub fn expected(self, expected: impl Into<String>) -> Self {
        Difference { expected: Some(expected.into()), ..self }
    }

    pub fn found(self, found: impl Into<String>) -> Self {
        Difference { found: Some(found.into()), ..self }
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.words(), self.place)?;
        if let Some(expected) = &self.expected {
            write!(f, "\n    expected: {expected}")?;
        }
        if let Some(found) = &self.found {
            write!(f, "\n    found:    {found}")?;
        }
        Ok(())
    }
}

/// `n` of `noun`, e.g. `1 rule`, `3 rules`.
pub fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// How many of a differing set's elements a message shows; the rest are counted.
const ELEMENTS_SHOWN: usize = 5;

/// `8 missing: a, b, c, d, e and 3 more`: how many `items` there are and the first few, for a
/// set that differs in both backends; `None` when there are none.
pub fn some_elements<T: fmt::Display>(what: &str, items: &[T]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let shown: Vec<String> = items.iter().take(ELEMENTS_SHOWN).map(ToString::to_string).collect();
    let more = if items.len() > ELEMENTS_SHOWN { format!(" and {} more", items.len() - ELEMENTS_SHOWN) } else { String::new() };
    Some(format!("{} {what}: {}{more}", items.len(), shown.join(", ")))
}

/// One step that turns a chain's found rules into the expected ones (0-based indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleChange {
    /// Expected rule `want` is not there.
    Missing { want: usize },
    /// Found rule `have` is not expected.
    Unexpected { have: usize },
    /// Found rule `have` stands where expected rule `want` should.
    Differs { want: usize, have: usize },
}

/// How a chain's rules differ from the expected ones, in order: every rule that is where it
/// belongs (a longest common subsequence of both) stays out of it, and in each gap between
/// those, found and expected rules pair up as differing ones, the rest missing or unexpected.
pub fn rule_changes<T: PartialEq>(want: &[T], have: &[T]) -> Vec<RuleChange> {
    // The common head and tail need no table (a tampered rule leaves a gap of one).
    let head = want.iter().zip(have).take_while(|(w, h)| w == h).count();
    let tail = want[head..].iter().rev().zip(have[head..].iter().rev()).take_while(|(w, h)| w == h).count();
    let (want_mid, have_mid) = (&want[head..want.len() - tail], &have[head..have.len() - tail]);
    // lcs[i][j]: the longest common subsequence of want_mid[i..] and have_mid[j..].
    let (n, m) = (want_mid.len(), have_mid.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if want_mid[i] == have_mid[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let mut changes = Vec::new();
    let (mut missing, mut unexpected) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && want_mid[i] == have_mid[j] {
            flush_gap(&mut changes, &mut missing, &mut unexpected);
            (i, j) = (i + 1, j + 1);
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            unexpected.push(head + j);
            j += 1;
        } else {
            missing.push(head + i);
            i += 1;
        }
    }
    flush_gap(&mut changes, &mut missing, &mut unexpected);
    changes
}

fn flush_gap(changes: &mut Vec<RuleChange>, missing: &mut Vec<usize>, unexpected: &mut Vec<usize>) {
    let paired = missing.len().min(unexpected.len());
    changes.extend(missing.iter().zip(unexpected.iter()).map(|(&want, &have)| RuleChange::Differs { want, have }));
    changes.extend(missing[paired..].iter().map(|&want| RuleChange::Missing { want }));
    changes.extend(unexpected[paired..].iter().map(|&have| RuleChange::Unexpected { have }));
    missing.clear();
    unexpected.clear();
}

/// The differences of one chain's rules, at `place` (the chain's); `found_at` gives the
/// position of a found rule in its chain (1-based), `show_*` write a rule.
pub fn chain_rule_differences<T: PartialEq>(
    place: &str,
    (want, have): (&[T], &[T]),
    found_at: impl Fn(usize) -> usize,
    show_expected: impl Fn(usize) -> String,
    show_found: impl Fn(usize) -> String,
) -> Vec<Difference> {
    let at = |position: usize| format!("{place}, rule {position}");
    rule_changes(want, have)
        .into_iter()
        .map(|change| match change {
            RuleChange::Missing { want } => Difference::new(Kind::RuleMissing, at(want + 1)).expected(show_expected(want)),
            RuleChange::Unexpected { have } => Difference::new(Kind::UnexpectedRule, at(found_at(have))).found(show_found(have)),
            RuleChange::Differs { want, have } => {
                Difference::new(Kind::RuleDiffers, at(found_at(have))).expected(show_expected(want)).found(show_found(have))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tampered_rule_differs_in_place() {
        assert_eq!(rule_changes(&["a", "b", "c"], &["a", "x", "c"]), vec![RuleChange::Differs { want: 1, have: 1 }]);
    }

    #[test]
    fn extra_and_lost_rules_keep_their_positions() {
        assert_eq!(rule_changes(&["a", "b", "c"], &["a", "b", "x", "c"]), vec![RuleChange::Unexpected { have: 2 }]);
        assert_eq!(rule_changes(&["a", "b", "c"], &["a", "c"]), vec![RuleChange::Missing { want: 1 }]);
        assert_eq!(rule_changes(&["a"], &[]), vec![RuleChange::Missing { want: 0 }]);
        assert!(rule_changes(&["a", "b"], &["a", "b"]).is_empty());
    }

    #[test]
    fn a_moved_rule_is_missing_in_one_place_and_unexpected_in_another() {
        let changes = rule_changes(&["a", "b", "c", "d"], &["b", "c", "a", "d"]);
        assert_eq!(changes, vec![RuleChange::Missing { want: 0 }, RuleChange::Unexpected { have: 2 }]);
    }

    #[test]
    fn shown_with_kind_place_expected_and_found() {
        let place = "table inet t, chain c";
        let shown: Vec<String> =
            chain_rule_differences(place, (&[1, 2, 3], &[1, 5, 3, 4]), |i| i + 1, |i| format!("want{i}"), |i| format!("have{i}"))
                .iter()
                .map(Difference::to_string)
                .collect();
        assert_eq!(
            shown,
            [
                "rule differs: table inet t, chain c, rule 2\n    expected: want1\n    found:    have1",
                "unexpected rule: table inet t, chain c, rule 4\n    found:    have3",
            ]
        );
    }
}
