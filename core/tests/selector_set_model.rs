//! `SelectorSet` against a model: a `BTreeSet<Selector>`. Whatever the selectors and the order
//! they come in, the set iterates, compares, inserts, matches and (de)serializes exactly as the
//! B-tree set would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use sigil_core::{Selector, SelectorSet};

/// A few selectors from a small alphabet, so that sets overlap and repeat often.
fn selectors() -> impl Strategy<Value = Vec<Selector>> {
    proptest::collection::vec(
        ("(unix|k8s|a-|a|b_)", "(uid:[0-9]|gid:[0-9]|path:/[ab])")
            .prop_map(|(kind, value)| Selector::new(&kind, &value).unwrap()),
        0..6,
    )
}

fn model(list: &[Selector]) -> BTreeSet<Selector> {
    list.iter().cloned().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn behaves_as_a_btree_set(a in selectors(), b in selectors(), extra in selectors()) {
        let (set_a, set_b): (SelectorSet, SelectorSet) =
            (a.iter().cloned().collect(), b.iter().cloned().collect());
        let (model_a, model_b) = (model(&a), model(&b));

        let iterated: Vec<&Selector> = set_a.iter().collect();
        prop_assert_eq!(iterated, model_a.iter().collect::<Vec<_>>());
        prop_assert_eq!(set_a.len(), model_a.len());
        prop_assert_eq!(set_a == set_b, model_a == model_b);
        prop_assert_eq!(set_a.cmp(&set_b), model_a.cmp(&model_b));
        prop_assert_eq!(
            set_a.matches(&set_b),
            !model_a.is_empty() && model_a.is_subset(&model_b)
        );
        for s in &b {
            prop_assert_eq!(set_a.contains(s), model_a.contains(s));
        }

        let mut inserted = set_a.clone();
        let mut model_inserted = model_a.clone();
        for s in &extra {
            prop_assert_eq!(inserted.insert(s.clone()), model_inserted.insert(s.clone()));
        }
        prop_assert_eq!(inserted.iter().collect::<Vec<_>>(), model_inserted.iter().collect::<Vec<_>>());
        let mut extended = set_a.clone();
        extended.extend(extra.iter().cloned());
        prop_assert_eq!(&extended, &inserted);

        // JSON: the sorted list; read back in any order and with repeats, the same set.
        let json = serde_json::to_string(&set_a).unwrap();
        let want: Vec<String> = model_a.iter().map(ToString::to_string).collect();
        prop_assert_eq!(&json, &serde_json::to_string(&want).unwrap());
        let shuffled: Vec<String> = a.iter().rev().chain(a.iter()).map(ToString::to_string).collect();
        let back: SelectorSet = serde_json::from_str(&serde_json::to_string(&shuffled).unwrap()).unwrap();
        prop_assert_eq!(back, set_a);
    }
}
