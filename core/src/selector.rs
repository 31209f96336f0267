//! Selectors and the rule that matches registration entries to workloads.
//!
//! A selector is a `type:value` pair produced by an attestor (`unix:uid:1000`, where the type is
//! `unix` and the value `uid:1000`): the value may itself contain `:`. An entry applies to a
//! workload when **every** selector of the entry is among the workload's selectors (the entry's
//! set is a subset of the workload's), as in SPIRE.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest selector type, in bytes.
pub const MAX_SELECTOR_TYPE_LEN: usize = 64;

/// The longest selector value, in bytes (long enough for any path the unix attestor reports).
pub const MAX_SELECTOR_VALUE_LEN: usize = 4096;

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// There is no `:` separating the type from the value.
    #[error("selector must have the form type:value")]
    MissingSeparator,
    /// The type (before the first `:`) is empty.
    #[error("selector type cannot be empty")]
    EmptyType,
    /// The type has a character outside `a-z 0-9 _ -`.
    #[error(
        "selector type characters are limited to lowercase letters, numbers, underscores and dashes"
    )]
    BadTypeChar,
    /// The type is longer than [`MAX_SELECTOR_TYPE_LEN`].
    #[error("selector type is {len} bytes long; the maximum is 64")]
    TypeTooLong {
        /// The length found, in bytes.
        len: usize,
    },
    /// The value (after the first `:`) is empty.
    #[error("selector value cannot be empty")]
    EmptyValue,
    /// The value contains a control character (such as a newline), which could forge log lines.
    #[error("selector value cannot contain control characters")]
    ControlChar,
    /// The value is longer than [`MAX_SELECTOR_VALUE_LEN`].
    #[error("selector value is {len} bytes long; the maximum is 4096")]
    ValueTooLong {
        /// The length found, in bytes.
        len: usize,
    },
}

/// One selector: an attestor-defined type and a value, written `type:value`.
///
/// Held as its text in one allocation (a server holds one per registration entry, an agent one
/// per cached SVID). Ordered by type, then value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    /// `type:value`. The type has no `:`, so the text says which is which.
    text: Box<str>,
    /// Where the `:` is: the length of the type.
    colon: usize,
}

/// A set of selectors: what an attestor reports for a workload, or what an entry requires.
///
/// Ordered and free of duplicates, so two sets with the same selectors are equal whatever order
/// they were given in.
///
/// Held as a sorted slice without duplicates: the same order, equality and ordering as a
/// `BTreeSet`, in one small allocation (a server holds one per registration entry, an agent one
/// per cached SVID; a B-tree node for a single selector costs half a kilobyte), and a single
/// selector, the most common set, in none.
#[derive(Clone, Default)]
pub struct SelectorSet {
    /// Sorted, no duplicates.
    selectors: Selectors,
}

/// The selectors of a set: one inline, else a slice (never of one, so that a set has one form).
#[derive(Clone)]
enum Selectors {
    One(Selector),
    Many(Box<[Selector]>),
}

// === impl Selector ===

impl Selector {
    /// Builds a selector from its type and value, checking both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if kind.len() > MAX_SELECTOR_TYPE_LEN {
            return Err(SelectorError::TypeTooLong { len: kind.len() });
        }
        if !kind
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            return Err(SelectorError::BadTypeChar);
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN {
            return Err(SelectorError::ValueTooLong { len: value.len() });
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar);
        }
        Ok(Self {
            text: format!("{kind}:{value}").into_boxed_str(),
            colon: kind.len(),
        })
    }

    /// Parses `type:value`, splitting at the first `:` (the value may contain more).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s.split_once(':').ok_or(SelectorError::MissingSeparator)?;
        Self::new(kind, value)
    }

    /// The selector type, such as `unix`.
    pub fn kind(&self) -> &str {
        self.text.get(..self.colon).unwrap_or_default()
    }

    /// The selector value, such as `uid:1000`.
    pub fn value(&self) -> &str {
        self.text.get(self.colon + 1..).unwrap_or_default()
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Selector {
    /// By type, then by value (not by the text: `a-b:x` sorts after `a:y`, as it always has;
    /// sets are kept in this order).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.kind()
            .cmp(other.kind())
            .then_with(|| self.value().cmp(other.value()))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

// === impl SelectorSet ===

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector; returns false when it was already present.
    pub fn insert(&mut self, selector: Selector) -> bool {
        match self.as_slice().binary_search(&selector) {
            Ok(_) => false,
            Err(at) => {
                let mut selectors = std::mem::take(&mut self.selectors).into_vec();
                selectors.insert(at, selector);
                self.selectors = Selectors::from_sorted(selectors);
                true
            }
        }
    }

    /// True when the set holds `selector`.
    pub fn contains(&self, selector: &Selector) -> bool {
        self.as_slice().binary_search(selector).is_ok()
    }

    /// The number of selectors.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The selectors, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.as_slice().iter()
    }

    /// The selectors, in order.
    pub fn as_slice(&self) -> &[Selector] {
        match &self.selectors {
            Selectors::One(one) => std::slice::from_ref(one),
            Selectors::Many(many) => many,
        }
    }

    /// True when an entry requiring `self` applies to a workload whose attested selectors are
    /// `workload`: every selector of the entry is among the workload's.
    ///
    /// An entry with no selectors matches nothing: a registration must name at least one
    /// property of the workload, so an empty set never grants an identity (fail closed).
    pub fn matches(&self, workload: &SelectorSet) -> bool {
        !self.is_empty() && self.iter().all(|s| workload.contains(s))
    }

    fn from_vec(mut selectors: Vec<Selector>) -> Self {
        selectors.sort_unstable();
        selectors.dedup();
        Self {
            selectors: Selectors::from_sorted(selectors),
        }
    }
}

impl PartialEq for SelectorSet {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SelectorSet {}

impl std::hash::Hash for SelectorSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialOrd for SelectorSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SelectorSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl Serialize for SelectorSet {
    /// A sequence of strings, in order.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.as_slice())
    }
}

// === impl Selectors ===

impl Selectors {
    /// `selectors` (sorted, no duplicates) in their form.
    fn from_sorted(selectors: Vec<Selector>) -> Self {
        match <[Selector; 1]>::try_from(selectors) {
            Ok([one]) => Self::One(one),
            Err(selectors) => Self::Many(selectors.into_boxed_slice()),
        }
    }

    fn into_vec(self) -> Vec<Selector> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many.into_vec(),
        }
    }
}

impl Default for Selectors {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self::from_vec(iter.into_iter().collect())
    }
}

impl Extend<Selector> for SelectorSet {
    fn extend<I: IntoIterator<Item = Selector>>(&mut self, iter: I) {
        let mut selectors = std::mem::take(&mut self.selectors).into_vec();
        selectors.extend(iter);
        *self = Self::from_vec(selectors);
    }
}

impl<'de> Deserialize<'de> for SelectorSet {
    /// Any order, duplicates dropped: the same as collecting into the set.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<Selector>::deserialize(deserializer).map(Self::from_vec)
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SelectorError as E;

    fn set(selectors: &[&str]) -> SelectorSet {
        selectors
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn parse_splits_at_first_colon() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");

        let s = Selector::parse("docker:label:com.example:a=b").unwrap();
        assert_eq!(s.kind(), "docker");
        assert_eq!(s.value(), "label:com.example:a=b");

        let s = Selector::parse("unix:path:/usr/bin/my app").unwrap();
        assert_eq!(s.value(), "path:/usr/bin/my app");
    }

    #[test]
    fn parse_rejections() {
        let long_type = format!("{}:v", "a".repeat(MAX_SELECTOR_TYPE_LEN + 1));
        let long_value = format!("t:{}", "v".repeat(MAX_SELECTOR_VALUE_LEN + 1));
        let cases: &[(&str, &str, SelectorError)] = &[
            ("no separator", "unix", E::MissingSeparator),
            ("empty", "", E::MissingSeparator),
            ("empty type", ":uid:0", E::EmptyType),
            ("empty value", "unix:", E::EmptyValue),
            ("uppercase type", "Unix:uid:0", E::BadTypeChar),
            ("space in type", "un ix:uid:0", E::BadTypeChar),
            ("newline in value", "unix:uid:0\nunix:uid:1", E::ControlChar),
            ("nul in value", "unix:uid:\0", E::ControlChar),
            ("type too long", &long_type, E::TypeTooLong { len: 65 }),
            ("value too long", &long_value, E::ValueTooLong { len: 4097 }),
        ];
        for (name, input, want) in cases {
            assert_eq!(
                Selector::parse(input).as_ref(),
                Err(want),
                "{name}: {input:?}"
            );
        }
        assert!(Selector::parse(&format!("{}:v", "a".repeat(64))).is_ok());
    }

    #[test]
    fn entry_applies_when_its_selectors_are_a_subset_of_the_workloads() {
        let workload = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        let cases: &[(&str, &[&str], bool)] = &[
            ("one selector present", &["unix:uid:1000"], true),
            (
                "two selectors present",
                &["unix:uid:1000", "unix:gid:1000"],
                true,
            ),
            (
                "all selectors",
                &["unix:uid:1000", "unix:gid:1000", "unix:user:alice"],
                true,
            ),
            (
                "one of two missing",
                &["unix:uid:1000", "unix:gid:0"],
                false,
            ),
            ("different value", &["unix:uid:0"], false),
            ("value is a prefix", &["unix:uid:100"], false),
            ("different type", &["k8s:uid:1000"], false),
            (
                "more than the workload has",
                &[
                    "unix:uid:1000",
                    "unix:gid:1000",
                    "unix:user:alice",
                    "unix:group:staff",
                ],
                false,
            ),
        ];
        for (name, entry, want) in cases {
            assert_eq!(set(entry).matches(&workload), *want, "{name}");
        }
    }

    #[test]
    fn an_entry_without_selectors_matches_nothing() {
        let empty = SelectorSet::new();
        assert!(!empty.matches(&set(&["unix:uid:0"])));
        assert!(!empty.matches(&SelectorSet::new()));
    }

    /// A set of one selector is held inline and larger ones in a slice: however a set was
    /// built, the same selectors make an equal set, with the same hash, order and text.
    #[test]
    fn a_set_is_one_value_whatever_its_form() {
        use std::hash::{BuildHasher, RandomState};
        let hash = RandomState::new();
        let mut grown = SelectorSet::new();
        assert!(grown.insert(Selector::parse("unix:uid:1").unwrap()));
        assert_eq!(grown, set(&["unix:uid:1"]));
        assert_eq!(hash.hash_one(&grown), hash.hash_one(set(&["unix:uid:1"])));
        assert!(!grown.insert(Selector::parse("unix:uid:1").unwrap()));
        assert_eq!(grown.len(), 1);
        assert!(grown.insert(Selector::parse("a:b").unwrap()));
        let two = set(&["unix:uid:1", "a:b", "a:b"]);
        assert_eq!(grown, two);
        assert_eq!(hash.hash_one(&grown), hash.hash_one(&two));
        assert_eq!(grown.as_slice().len(), 2);
        let mut extended = set(&["unix:uid:1"]);
        extended.extend([Selector::parse("a:b").unwrap()]);
        assert_eq!(extended, two);
        // Ordered as their slices: [a:b, unix:uid:1] < [unix:uid:1] < [unix:uid:2].
        assert!(two < set(&["unix:uid:1"]));
        assert!(set(&["unix:uid:1"]) < set(&["unix:uid:2"]));
        assert!(SelectorSet::new() < set(&["a:b"]));
        for s in [SelectorSet::new(), set(&["unix:uid:1"]), two] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<SelectorSet>(&json).unwrap(), s);
            let as_set: std::collections::BTreeSet<_> = s.iter().collect();
            assert_eq!(format!("{s:?}"), format!("{as_set:?}"));
        }
        assert_eq!(
            serde_json::to_string(&set(&["unix:uid:1"])).unwrap(),
            r#"["unix:uid:1"]"#
        );
        assert!(set(&["unix:uid:1"]).matches(&set(&["unix:uid:1", "a:b"])));
        assert!(!set(&["unix:uid:1"]).matches(&set(&["a:b"])));
    }

    #[test]
    fn selectors_sort_by_type_then_value_not_by_text() {
        // By text `a-b:x` would come first ('-' sorts before ':'); sets have always been kept
        // in (type, value) order, and what is stored and hashed follows that order.
        let sorted: Vec<String> = set(&["a-b:x", "a:y", "a:b:c", "unix:uid:1"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(sorted, ["a:b:c", "a:y", "a-b:x", "unix:uid:1"]);
        let s = Selector::parse("k8s:ns:default").unwrap();
        assert_eq!((s.kind(), s.value()), ("k8s", "ns:default"));
    }

    #[test]
    fn sets_ignore_order_and_duplicates() {
        let a = set(&["unix:uid:1", "unix:gid:2", "unix:uid:1"]);
        let b = set(&["unix:gid:2", "unix:uid:1"]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        let mut c = SelectorSet::new();
        assert!(c.insert(Selector::parse("unix:uid:1").unwrap()));
        assert!(!c.insert(Selector::parse("unix:uid:1").unwrap()));
        assert!(c.contains(&Selector::new("unix", "uid:1").unwrap()));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let s = set(&["unix:uid:1000", "unix:path:/bin/x"]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["unix:path:/bin/x","unix:uid:1000"]"#);
        assert_eq!(serde_json::from_str::<SelectorSet>(&json).unwrap(), s);
        assert!(serde_json::from_str::<SelectorSet>(r#"["nocolon"]"#).is_err());
    }
}
