//! Times as the CLI shows and reads them: RFC 3339 in UTC, from sigil-core.

pub(crate) use sigil_core::time::{
    format_rfc3339, format_rfc3339_nanos, format_with_distance, now_unix, parse_rfc3339,
};
