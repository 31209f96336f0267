//! Property tests for the parsers: whatever the input, parsing returns `Ok` or an error and never
//! panics, and whatever parses prints back to the same string.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use proptest::prelude::*;
use sigil_core::{EndpointAddress, Selector, SpiffeId, TrustDomain};

/// Strings that look like SPIFFE IDs often enough to reach every branch of the parser.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(spiffe|Spiffe|http|)(://|:/|:)[a-zA-Z0-9.%@:\\[\\]_~-]{0,12}(/[a-zA-Z0-9.%?#_ -]{0,6}){0,4}/?",
        "spiffe://[a-z0-9._-]{1,300}(/[a-zA-Z0-9._-]{1,8}){0,3}",
    ]
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,12}".prop_filter("not a dot segment", |s| s != "." && s != "..")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn spiffe_id_parse_never_panics_and_round_trips(input in id_like()) {
        if let Ok(id) = SpiffeId::new(&input) {
            prop_assert_eq!(id.to_string(), input.clone());
            prop_assert_eq!(SpiffeId::new(id.as_str()), Ok(id.clone()));
            prop_assert!(input.len() <= sigil_core::spiffe_id::MAX_SPIFFE_ID_LEN);
            prop_assert_eq!(id.trust_domain().root_id().trust_domain(), id.trust_domain());
        }
    }

    #[test]
    fn valid_ids_always_parse(
        td in "[a-z0-9._-]{1,40}",
        segments in proptest::collection::vec(segment(), 0..6),
    ) {
        let input = format!("spiffe://{td}{}", segments.iter().map(|s| format!("/{s}")).collect::<String>());
        let id = SpiffeId::new(&input).unwrap();
        prop_assert_eq!(id.as_str(), input.as_str());
        prop_assert_eq!(id.trust_domain_name(), td.as_str());
        prop_assert_eq!(id.segments().collect::<Vec<_>>(), segments.iter().map(String::as_str).collect::<Vec<_>>());
        // Building from parts gives the same ID as parsing.
        let built = TrustDomain::new(&td).unwrap().id(&segments).unwrap();
        prop_assert_eq!(built, id);
    }

    #[test]
    fn trust_domain_parse_never_panics_and_round_trips(input in id_like()) {
        if let Ok(td) = TrustDomain::new(&input) {
            let printed = if input.starts_with("spiffe://") { td.id_string() } else { td.to_string() };
            prop_assert_eq!(printed, input);
        }
    }

    #[test]
    fn selector_parse_never_panics_and_round_trips(input in prop_oneof![any::<String>(), "[a-z_-]{0,5}:[ -~]{0,20}"]) {
        if let Ok(selector) = Selector::parse(&input) {
            prop_assert_eq!(selector.to_string(), input.clone());
            prop_assert_eq!(Selector::parse(&selector.to_string()), Ok(selector));
        }
    }

    #[test]
    fn endpoint_parse_never_panics_and_round_trips(
        input in prop_oneof![
            any::<String>(),
            "(unix|tcp|http):(//)?[a-z0-9.@:\\[\\]]{0,12}(/[a-z0-9%. ?#]{0,8}){0,3}",
        ]
    ) {
        if let Ok(addr) = EndpointAddress::parse(&input) {
            prop_assert_eq!(EndpointAddress::parse(&addr.to_string()), Ok(addr));
        }
    }
}
